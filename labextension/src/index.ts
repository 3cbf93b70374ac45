/**
 * jupyter-elastic-gpu: the "GPU" sidebar and the kernel's GPU status-bar item.
 */
import {
  ILabShell,
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette, ISessionContext } from '@jupyterlab/apputils';
import { IStatusBar } from '@jupyterlab/statusbar';
import { Widget } from '@lumino/widgets';

import { gpuIcon } from './icon';
import { GpuSidebar, SIDEBAR_ID } from './sidebar';
import { GpuStatusItem } from './statusbar';

export const COMMAND_OPEN = 'elastic-gpu:open-sidebar';

function sessionContextOf(widget: Widget | null): ISessionContext | null {
  const ctx = (widget as unknown as { sessionContext?: ISessionContext } | null)?.sessionContext;
  return ctx && typeof ctx === 'object' && 'kernelChanged' in ctx ? ctx : null;
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'jupyter-elastic-gpu:plugin',
  description: 'GPU sidebar (quota, leases, pool) and status-bar item for elastic GPU kernels.',
  autoStart: true,
  requires: [ILabShell],
  optional: [IStatusBar, ILayoutRestorer, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    labShell: ILabShell,
    statusBar: IStatusBar | null,
    restorer: ILayoutRestorer | null,
    palette: ICommandPalette | null
  ) => {
    const sidebar = new GpuSidebar();
    labShell.add(sidebar, 'left', { rank: 650, type: 'GPU' });
    if (restorer) {
      restorer.add(sidebar, SIDEBAR_ID);
    }

    app.commands.addCommand(COMMAND_OPEN, {
      label: 'Show GPU Panel',
      caption: 'Show my GPU quota, leases and the GPU pool',
      icon: gpuIcon,
      execute: () => labShell.activateById(SIDEBAR_ID)
    });
    if (palette) {
      palette.addItem({ command: COMMAND_OPEN, category: 'GPU' });
    }

    if (statusBar) {
      const item = new GpuStatusItem({
        specs: app.serviceManager.kernelspecs,
        onClick: () => void app.commands.execute(COMMAND_OPEN)
      });
      statusBar.registerStatusItem('jupyter-elastic-gpu:status', {
        item,
        align: 'left',
        rank: 4,
        isActive: () => item.isGpuKernel,
        activeStateChanged: item.activeStateChanged
      });
      const follow = () => item.setSessionContext(sessionContextOf(labShell.currentWidget));
      labShell.currentChanged.connect(follow);
      follow();
    }
  }
};

export default plugin;
