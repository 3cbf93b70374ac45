import { LabIcon } from '@jupyterlab/ui-components';

import gpuSvgStr from '../style/icons/gpu.svg';

export const gpuIcon = new LabIcon({ name: 'jupyter-elastic-gpu:gpu', svgstr: gpuSvgStr });
