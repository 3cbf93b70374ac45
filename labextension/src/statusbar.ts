/**
 * Status-bar item for the current notebook/console's kernel: "GPU 0.5 · idle",
 * "GPU 0.5 · attached", "GPU 0.5 · waiting (#2)". Shown only for elastic-GPU kernels;
 * clicking it (or Enter/Space) opens the GPU sidebar.
 */
import { ISessionContext } from '@jupyterlab/apputils';
import { KernelSpec } from '@jupyterlab/services';
import { ISignal, Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';

import { GpuApiError, requestAPI } from './api';
import { IKernelGpuState, gpuFractionFromSpec, pollDelay, statusText } from './model';

type Fetcher = <T>(endPoint: string) => Promise<T>;

export class GpuStatusItem extends Widget {
  constructor(options: {
    specs: KernelSpec.IManager;
    onClick: () => void;
    fetcher?: Fetcher;
  }) {
    super({ node: document.createElement('div') });
    this._specs = options.specs;
    this._onClick = options.onClick;
    this._fetch = options.fetcher ?? requestAPI;
    this.addClass('jp-ElasticGpu-status');
    this.node.tabIndex = 0;
    this.node.setAttribute('role', 'button');
    this._text = document.createElement('span');
    this._text.className = 'jp-ElasticGpu-statusText';
    this.node.appendChild(this._text);
    this.node.addEventListener('click', this);
    this.node.addEventListener('keydown', this);
    this._specs.specsChanged.connect(this._recompute, this);
  }

  /** Fires when the item should appear or disappear. */
  get activeStateChanged(): ISignal<this, void> {
    return this._activeChanged;
  }

  get isGpuKernel(): boolean {
    return this._fraction !== null;
  }

  /** Follow another notebook/console (or none). */
  setSessionContext(ctx: ISessionContext | null): void {
    if (ctx === this._ctx) {
      return;
    }
    if (this._ctx) {
      this._ctx.kernelChanged.disconnect(this._recompute, this);
      this._ctx.statusChanged.disconnect(this._onStatus, this);
    }
    this._ctx = ctx;
    if (ctx) {
      ctx.kernelChanged.connect(this._recompute, this);
      ctx.statusChanged.connect(this._onStatus, this);
    }
    this._recompute();
  }

  handleEvent(event: Event): void {
    if (event.type === 'click') {
      this._onClick();
    } else if (event.type === 'keydown') {
      const key = (event as KeyboardEvent).key;
      if (key === 'Enter' || key === ' ') {
        event.preventDefault();
        this._onClick();
      }
    }
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._stop();
    this.setSessionContext(null);
    Signal.clearData(this);
    super.dispose();
  }

  private _kernelId(): string | null {
    return this._ctx?.session?.kernel?.id ?? null;
  }

  private _recompute(): void {
    const name = this._ctx?.session?.kernel?.name ?? null;
    const spec = name ? this._specs.specs?.kernelspecs[name] : undefined;
    const fraction = spec ? gpuFractionFromSpec(spec.metadata) : null;
    const kernelId = this._kernelId();
    const wasActive = this._fraction !== null;
    const changedKernel = kernelId !== this._polledKernel;
    this._fraction = fraction;
    if (changedKernel) {
      this._state = null;
      this._error = false;
    }
    this._render();
    if (wasActive !== (fraction !== null)) {
      this._activeChanged.emit();
    }
    if (fraction !== null && kernelId) {
      if (changedKernel || this._timer === null) {
        this._polledKernel = kernelId;
        this._failures = 0;
        void this._poll();
      }
    } else {
      this._stop();
    }
  }

  /** Kernel went busy/idle: a lease may have been taken or given back; look now. */
  private _onStatus(): void {
    if (this._fraction !== null && this._polledKernel) {
      void this._poll();
    }
  }

  private async _poll(): Promise<void> {
    this._clearTimer();
    const kernelId = this._polledKernel;
    if (!kernelId || this._fraction === null) {
      return;
    }
    const gen = ++this._generation;
    try {
      const state = await this._fetch<IKernelGpuState>(
        `kernels/${encodeURIComponent(kernelId)}`
      );
      if (gen !== this._generation || kernelId !== this._polledKernel) {
        return;
      }
      this._state = state;
      this._error = false;
      this._errorMessage = '';
      this._failures = 0;
      // The server extension reads the kernelspec as the provisioner does: its fraction wins
      // over the spec seen here (and "not a GPU kernel" stops the polling).
      const served = state.gpu ? state.fraction : null;
      if (served !== this._fraction) {
        this._fraction = served;
        this._activeChanged.emit();
      }
    } catch (error) {
      if (gen !== this._generation || kernelId !== this._polledKernel) {
        return;
      }
      this._failures++;
      this._error = true;
      this._errorMessage = error instanceof GpuApiError ? error.message : String(error);
      if (error instanceof GpuApiError && error.status === 404) {
        // The kernel is gone (restart/shutdown): wait for kernelChanged.
        this._state = null;
      }
    }
    this._render();
    if (this._fraction !== null && this._polledKernel === kernelId && !this.isDisposed) {
      this._timer = window.setTimeout(() => void this._poll(), pollDelay(this._failures));
    }
  }

  private _render(): void {
    const text = statusText(this._fraction, this._state, this._error);
    if (this._text.textContent !== text) {
      this._text.textContent = text;
    }
    const state = this._error ? 'error' : this._state?.state ?? 'idle';
    this.node.dataset.state = state;
    const title = this._error
      ? `${text}: ${this._errorMessage}. Click to open the GPU panel.`
      : `${text}. Click to open the GPU panel.`;
    this.node.title = title;
    this.node.setAttribute('aria-label', title);
  }

  private _stop(): void {
    this._clearTimer();
    this._generation++;
    this._polledKernel = null;
  }

  private _clearTimer(): void {
    if (this._timer !== null) {
      window.clearTimeout(this._timer);
      this._timer = null;
    }
  }

  private _specs: KernelSpec.IManager;
  private _onClick: () => void;
  private _fetch: Fetcher;
  private _ctx: ISessionContext | null = null;
  private _text: HTMLSpanElement;
  private _fraction: number | null = null;
  private _state: IKernelGpuState | null = null;
  private _error = false;
  private _errorMessage = '';
  private _failures = 0;
  private _generation = 0;
  private _polledKernel: string | null = null;
  private _timer: number | null = null;
  private _activeChanged = new Signal<this, void>(this);
}
