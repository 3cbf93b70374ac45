/**
 * Polls the server extension with backoff: every 2 s while things work, doubling up to
 * 30 s after consecutive failures, and only while someone is looking (the owner calls
 * start()/stop()). Keeps the last good data when a poll fails, so the view can show it
 * (dimmed) under the "unreachable" banner instead of going blank.
 */
import { ISignal, Signal } from '@lumino/signaling';

import { GpuApiError, requestAPI } from './api';
import { ILease, IMe, IPool, ISession, IUsage, pollDelay } from './model';

export interface ISidebarData {
  me: IMe | null;
  pool: IPool | null;
  sessions: ISession[] | null;
  usage: IUsage | null;
  usageError: string | null;
  allLeases: ILease[] | null;
  /** The last poll's failure, null when it worked. */
  error: GpuApiError | null;
  /** Time of the last successful poll (ms). */
  updatedAt: number | null;
  /** When the next poll is due (ms), for the "retrying in Ns" countdown. */
  nextPollAt: number | null;
  loading: boolean;
}

export type Fetcher = <T>(endPoint: string) => Promise<T>;

export class GpuPoller {
  constructor(fetcher: Fetcher = requestAPI) {
    this._fetch = fetcher;
  }

  get data(): ISidebarData {
    return this._data;
  }

  get changed(): ISignal<this, ISidebarData> {
    return this._changed;
  }

  get running(): boolean {
    return this._running;
  }

  start(): void {
    if (this._running) {
      return;
    }
    this._running = true;
    void this.refresh();
  }

  stop(): void {
    this._running = false;
    this._clearTimer();
  }

  dispose(): void {
    this.stop();
    Signal.clearData(this);
  }

  /** Poll now (e.g. the "Retry now" button), then carry on with the schedule. */
  async refresh(): Promise<void> {
    this._clearTimer();
    if (this._inFlight) {
      return;
    }
    this._inFlight = true;
    const gen = ++this._generation;
    try {
      await this._poll();
      this._failures = 0;
    } catch (error) {
      this._failures++;
      const err =
        error instanceof GpuApiError ? error : new GpuApiError(String(error), 0, 'error');
      this._set({ error: err, loading: false });
    } finally {
      this._inFlight = false;
    }
    if (this._running && gen === this._generation) {
      const delay = pollDelay(this._failures);
      this._set({ nextPollAt: Date.now() + delay });
      this._timer = window.setTimeout(() => void this.refresh(), delay);
    }
  }

  private async _poll(): Promise<void> {
    const [me, pool] = await Promise.all([
      this._fetch<IMe>('me'),
      this._fetch<IPool>('pool')
    ]);
    // Best effort extras: a failure here never turns the whole panel red.
    const sessions = await this._fetch<{ sessions: ISession[] }>('sessions')
      .then(r => r.sessions || [])
      .catch(() => null);
    let usage: IUsage | null = null;
    let usageError: string | null = null;
    let allLeases: ILease[] | null = null;
    if (me.admin) {
      const [u, l] = await Promise.all([
        this._fetch<IUsage>('usage').catch((e: GpuApiError) => {
          usageError = e.message;
          return null;
        }),
        this._fetch<{ leases: ILease[] }>('leases?all=true')
          .then(r => r.leases || [])
          .catch(() => null)
      ]);
      usage = u;
      allLeases = l;
    }
    this._set({
      me,
      pool,
      sessions,
      usage,
      usageError,
      allLeases,
      error: null,
      updatedAt: Date.now(),
      loading: false
    });
  }

  private _set(patch: Partial<ISidebarData>): void {
    this._data = { ...this._data, ...patch };
    this._changed.emit(this._data);
  }

  private _clearTimer(): void {
    if (this._timer !== null) {
      window.clearTimeout(this._timer);
      this._timer = null;
    }
  }

  private _fetch: Fetcher;
  private _running = false;
  private _inFlight = false;
  private _failures = 0;
  private _generation = 0;
  private _timer: number | null = null;
  private _changed = new Signal<this, ISidebarData>(this);
  private _data: ISidebarData = {
    me: null,
    pool: null,
    sessions: null,
    usage: null,
    usageError: null,
    allLeases: null,
    error: null,
    updatedAt: null,
    nextPollAt: null,
    loading: true
  };
}
