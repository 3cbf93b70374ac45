/**
 * The "GPU" left-sidebar panel: my limit and use, my leases, my idle sessions, the pool
 * and (admins) all users. A ReactWidget re-rendered in place on each poll; every list
 * uses stable keys so nothing flickers.
 */
import { ReactWidget } from '@jupyterlab/ui-components';
import React from 'react';

import { GpuPoller, ISidebarData } from './poller';
import {
  IAgentRow,
  IGpuRow,
  ILeaseRow,
  ISessionRow,
  IUserRow,
  formatSince,
  idleSessionRows,
  leaseRows,
  poolRows,
  quotaBar,
  unreachableText,
  userRows
} from './model';
import { gpuIcon } from './icon';

export const SIDEBAR_ID = 'elastic-gpu-sidebar';

function Bar(props: {
  percent: number;
  label: string;
  level?: string;
  className?: string;
}): JSX.Element {
  const pct = Math.max(0, Math.min(100, props.percent));
  return (
    <div
      className={`jp-ElasticGpu-bar ${props.className ?? ''}`}
      role="progressbar"
      aria-label={props.label}
      aria-valuemin={0}
      aria-valuemax={100}
      aria-valuenow={Math.round(pct)}
      aria-valuetext={props.label}
    >
      <div
        className={`jp-ElasticGpu-barFill jp-mod-${props.level ?? 'ok'}`}
        style={{ width: `${pct}%` }}
      />
    </div>
  );
}

function Section(props: {
  id: string;
  title: string;
  count?: number;
  children: React.ReactNode;
}): JSX.Element {
  const headingId = `jp-ElasticGpu-h-${props.id}`;
  return (
    <section className="jp-ElasticGpu-section" aria-labelledby={headingId} data-section={props.id}>
      <h3 className="jp-ElasticGpu-sectionTitle" id={headingId}>
        {props.title}
        {props.count !== undefined && (
          <span className="jp-ElasticGpu-count" aria-label={`${props.count} items`}>
            {props.count}
          </span>
        )}
      </h3>
      {props.children}
    </section>
  );
}

function Quota(props: { data: ISidebarData }): JSX.Element | null {
  const me = props.data.me;
  if (!me) {
    return null;
  }
  const bar = quotaBar(me.limit, me.in_use);
  return (
    <Section id="quota" title="My GPU">
      <div className="jp-ElasticGpu-quota" data-testid="quota">
        <Bar percent={bar.percent} level={bar.level} label={`GPU quota: ${bar.text}`} />
        <div className="jp-ElasticGpu-quotaText" data-testid="quota-text">
          {bar.text}
        </div>
        {me.max_lease ? (
          <div className="jp-ElasticGpu-hint">Largest single request: {me.max_lease} GPU</div>
        ) : null}
      </div>
    </Section>
  );
}

function StatePill(props: { state: string; text: string }): JSX.Element {
  return (
    <span className={`jp-ElasticGpu-pill jp-mod-${props.state}`} data-state={props.state}>
      {props.text}
    </span>
  );
}

function Leases(props: { rows: ILeaseRow[] }): JSX.Element {
  return (
    <Section id="leases" title="My leases" count={props.rows.length}>
      {props.rows.length === 0 ? (
        <div className="jp-ElasticGpu-empty">
          No GPU in use. A GPU kernel takes a slice while a cell runs GPU work.
        </div>
      ) : (
        <ul className="jp-ElasticGpu-list" aria-label="My GPU leases">
          {props.rows.map(r => (
            <li
              key={r.key}
              className="jp-ElasticGpu-lease"
              data-lease={r.key}
              tabIndex={0}
              aria-label={`${r.name}: ${r.fraction} GPU, ${r.stateText}`}
            >
              <div className="jp-ElasticGpu-row">
                <span className="jp-ElasticGpu-name" title={r.title}>
                  {r.name}
                </span>
                <StatePill state={r.state} text={r.stateText} />
              </div>
              <div className="jp-ElasticGpu-meta">
                <span>{r.fraction} GPU</span>
                <span>{r.gpu}</span>
                <span>{r.since}</span>
              </div>
              {r.blockedBy ? (
                <div className="jp-ElasticGpu-meta jp-ElasticGpu-blocked">
                  behind: {r.blockedBy}
                </div>
              ) : null}
            </li>
          ))}
        </ul>
      )}
    </Section>
  );
}

function IdleSessions(props: { rows: ISessionRow[] }): JSX.Element | null {
  if (props.rows.length === 0) {
    return null;
  }
  return (
    <Section id="sessions" title="Idle sessions" count={props.rows.length}>
      <ul className="jp-ElasticGpu-list" aria-label="My idle GPU sessions">
        {props.rows.map(r => (
          <li
            key={r.key}
            className="jp-ElasticGpu-session"
            tabIndex={0}
            aria-label={`${r.name}: ${r.memory} on ${r.where === 'host' ? 'host memory' : 'the GPU'}`}
          >
            <div className="jp-ElasticGpu-row">
              <span className="jp-ElasticGpu-name">{r.name}</span>
              <StatePill
                state={r.where === 'host' ? 'swapped' : 'idle'}
                text={r.where === 'host' ? 'swapped to host' : 'idle'}
              />
            </div>
            <div className="jp-ElasticGpu-meta">
              <span>{r.fraction} GPU</span>
              <span>{r.memory}</span>
              <span>{r.agent}</span>
            </div>
          </li>
        ))}
      </ul>
    </Section>
  );
}

function GpuCard(props: { gpu: IGpuRow }): JSX.Element {
  const g = props.gpu;
  return (
    <li
      className="jp-ElasticGpu-gpu"
      data-gpu={g.key}
      tabIndex={0}
      aria-label={`${g.label} ${g.name}: ${g.used}, utilisation ${g.utilization}, memory ${g.memory}`}
    >
      <div className="jp-ElasticGpu-row">
        <span className="jp-ElasticGpu-name" title={`${g.label} · ${g.name}`}>
          {g.label} · {g.name}
        </span>
      </div>
      <div className="jp-ElasticGpu-slices" aria-label={`Slices of ${g.label}`} role="list">
        {g.slices.map(s => (
          <div
            key={s.key}
            role="listitem"
            className={`jp-ElasticGpu-slice${s.mine ? ' jp-mod-mine' : ''}`}
            style={{ width: `${s.percent}%` }}
            title={s.label}
            aria-label={s.label}
          />
        ))}
      </div>
      <div className="jp-ElasticGpu-meta jp-ElasticGpu-sliceLabels">
        {g.slices.map(s => (
          <span key={s.key} className="jp-ElasticGpu-sliceLabel">
            {s.label}
          </span>
        ))}
        <span className="jp-ElasticGpu-used">{g.used}</span>
      </div>
      <div className="jp-ElasticGpu-metric">
        <span className="jp-ElasticGpu-metricLabel">Util</span>
        <Bar
          percent={g.utilizationPercent ?? 0}
          label={`${g.label} utilisation ${g.utilization}`}
          className="jp-ElasticGpu-small"
        />
        <span className="jp-ElasticGpu-metricValue">{g.utilization}</span>
      </div>
      <div className="jp-ElasticGpu-metric">
        <span className="jp-ElasticGpu-metricLabel">Mem</span>
        <Bar
          percent={g.memoryPercent ?? 0}
          label={`${g.label} memory ${g.memory}`}
          className="jp-ElasticGpu-small"
        />
        <span className="jp-ElasticGpu-metricValue">{g.memory}</span>
      </div>
    </li>
  );
}

function Pool(props: { rows: IAgentRow[] }): JSX.Element {
  const nGpus = props.rows.reduce((a, r) => a + r.gpus.length, 0);
  return (
    <Section id="pool" title="Pool" count={nGpus}>
      {props.rows.length === 0 ? (
        <div className="jp-ElasticGpu-empty">No GPU agents registered.</div>
      ) : (
        props.rows.map(a => (
          <div key={a.key} className="jp-ElasticGpu-agent" data-agent={a.key}>
            <div className="jp-ElasticGpu-agentTitle">
              <span
                className={`jp-ElasticGpu-dot${a.alive ? ' jp-mod-alive' : ''}`}
                aria-label={a.alive ? 'alive' : 'not responding'}
                role="img"
              />
              <span className="jp-ElasticGpu-name">{a.name}</span>
              {a.device ? <span className="jp-ElasticGpu-dim">{a.device}</span> : null}
              {!a.alive ? <span className="jp-ElasticGpu-dim">not responding</span> : null}
            </div>
            <ul className="jp-ElasticGpu-list" aria-label={`GPUs of ${a.name}`}>
              {a.gpus.map(g => (
                <GpuCard key={g.key} gpu={g} />
              ))}
            </ul>
          </div>
        ))
      )}
    </Section>
  );
}

function Users(props: { rows: IUserRow[]; error: string | null }): JSX.Element {
  return (
    <Section id="users" title="All users" count={props.rows.length}>
      {props.error ? <div className="jp-ElasticGpu-empty">{props.error}</div> : null}
      <table className="jp-ElasticGpu-table" aria-label="GPU use per user">
        <thead>
          <tr>
            <th scope="col">User</th>
            <th scope="col">Limit</th>
            <th scope="col">In use</th>
            <th scope="col">GPU-hours</th>
          </tr>
        </thead>
        <tbody>
          {props.rows.map(r => (
            <tr key={r.key} data-user={r.user}>
              <td>{r.user}</td>
              <td>{r.limit}</td>
              <td>{r.inUse}</td>
              <td>{r.hours}</td>
            </tr>
          ))}
        </tbody>
      </table>
    </Section>
  );
}

function Banner(props: {
  data: ISidebarData;
  now: number;
  onRetry: () => void;
}): JSX.Element | null {
  const { error, nextPollAt, updatedAt } = props.data;
  if (!error) {
    return null;
  }
  const unreachable = error.unreachable;
  const mode = error.mode ?? props.data.me?.mode;
  const retryIn = nextPollAt ? nextPollAt - props.now : 0;
  const headline = unreachable
    ? unreachableText(mode, retryIn)
    : `${error.message} — retrying in ${Math.max(0, Math.ceil(retryIn / 1000))}s`;
  return (
    <div className="jp-ElasticGpu-banner" role="alert" data-testid="unreachable">
      <div className="jp-ElasticGpu-bannerTitle">{headline}</div>
      {unreachable ? <div className="jp-ElasticGpu-bannerDetail">{error.message}</div> : null}
      {updatedAt ? (
        <div className="jp-ElasticGpu-bannerDetail">
          Showing data last updated {formatSince(updatedAt, props.now)}.
        </div>
      ) : null}
      <button className="jp-ElasticGpu-button jp-mod-styled" onClick={props.onRetry}>
        Retry now
      </button>
    </div>
  );
}

export function SidebarView(props: {
  data: ISidebarData;
  now: number;
  onRetry: () => void;
}): JSX.Element {
  const { data, now } = props;
  const me = data.me;
  const stale = !!data.error && !!data.updatedAt;
  return (
    <div className="jp-ElasticGpu-panel" aria-busy={data.loading}>
      <header className="jp-ElasticGpu-header">
        <gpuIcon.react tag="span" className="jp-ElasticGpu-headerIcon" />
        <h2 className="jp-ElasticGpu-title">GPU</h2>
        {me ? (
          <span className="jp-ElasticGpu-dim" data-testid="user">
            {me.user}
            {me.admin ? ' · admin' : ''}
            {me.mode === 'agent' ? ' · local agent' : ''}
          </span>
        ) : null}
      </header>
      <Banner data={data} now={now} onRetry={props.onRetry} />
      {data.loading && !data.error ? <div className="jp-ElasticGpu-empty">Loading…</div> : null}
      <div className={`jp-ElasticGpu-body${stale ? ' jp-mod-stale' : ''}`}>
        {me ? (
          <>
            <Quota data={data} />
            <Leases rows={leaseRows(me, now)} />
            <IdleSessions rows={idleSessionRows(data.sessions)} />
          </>
        ) : null}
        {data.pool ? <Pool rows={poolRows(data.pool, me?.user ?? null)} /> : null}
        {me?.admin ? (
          <Users rows={userRows(data.usage, data.allLeases)} error={data.usageError} />
        ) : null}
      </div>
    </div>
  );
}

/** The panel: polls while visible, re-renders in place, ticks a clock for countdowns. */
export class GpuSidebar extends ReactWidget {
  constructor(poller?: GpuPoller) {
    super();
    this.id = SIDEBAR_ID;
    this.addClass('jp-ElasticGpu-sidebar');
    this.title.icon = gpuIcon;
    this.title.caption = 'GPU';
    this.title.label = '';
    this.node.setAttribute('role', 'region');
    this.node.setAttribute('aria-label', 'GPU');
    this.node.tabIndex = -1;
    this._poller = poller ?? new GpuPoller();
    this._poller.changed.connect(this._onData, this);
  }

  get poller(): GpuPoller {
    return this._poller;
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._stopClock();
    this._poller.dispose();
    super.dispose();
  }

  protected onAfterShow(): void {
    this._poller.start();
    this._startClock();
  }

  protected onAfterHide(): void {
    this._poller.stop();
    this._stopClock();
  }

  protected onAfterAttach(msg: any): void {
    super.onAfterAttach(msg);
    if (this.isVisible) {
      this.onAfterShow();
    }
  }

  protected onBeforeDetach(msg: any): void {
    this.onAfterHide();
    super.onBeforeDetach(msg);
  }

  render(): JSX.Element {
    return (
      <SidebarView
        data={this._poller.data}
        now={Date.now()}
        onRetry={() => void this._poller.refresh()}
      />
    );
  }

  private _onData(): void {
    this.update();
  }

  /** Once a second: keeps "retrying in Ns" and "since" texts fresh. */
  private _startClock(): void {
    if (this._clock === null) {
      this._clock = window.setInterval(() => this.update(), 1000);
    }
  }

  private _stopClock(): void {
    if (this._clock !== null) {
      window.clearInterval(this._clock);
      this._clock = null;
    }
  }

  private _poller: GpuPoller;
  private _clock: number | null = null;
}
