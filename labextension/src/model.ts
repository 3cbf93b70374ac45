/**
 * Pure data-to-view logic of the GPU sidebar and status bar.
 *
 * Nothing here touches the DOM or JupyterLab: payloads of the server extension
 * (`{base_url}elastic-gpu/api/...`, the broker contract in docs/contracts.md) go in,
 * plain rows and strings come out. Unit-tested in `__tests__/model.spec.ts`.
 */

/* ------------------------------------------------------------------ payloads */

export interface IBlocker {
  id?: string;
  session?: string | null;
  notebook?: string | null;
  fraction?: number | null;
}

export interface ILease {
  id: string;
  user?: string | null;
  session?: string | null;
  kernel_name?: string | null;
  notebook?: string | null;
  fraction: number;
  state: 'queued' | 'granted' | 'ended' | string;
  position?: number | null;
  reason?: 'quota' | 'pool' | string | null;
  blocked_by?: IBlocker[] | null;
  agent?: { id?: string | null; address?: string | null } | null;
  gpus?: number[] | null;
  created?: string | number | null;
  granted_at?: string | number | null;
  expires?: string | number | null;
}

export interface IMe {
  user: string;
  admin: boolean;
  limit: number | null;
  in_use: number;
  fractions?: number[];
  max_lease?: number | null;
  leases: ILease[];
  queue: ILease[];
  mode?: 'broker' | 'agent' | string;
}

export interface ISlice {
  lease?: string | null;
  fraction: number;
  user?: string | null;
}

export interface IGpu {
  index: number;
  uuid?: string | null;
  name?: string | null;
  memory_total?: number | null;
  memory_used?: number | null;
  utilization?: number | null;
  mig?: boolean | null;
  free?: number | null;
  slices?: ISlice[] | null;
}

export interface IAgent {
  id: string;
  address?: string | null;
  device?: string | null;
  alive?: boolean;
  last_heartbeat?: string | number | null;
  gpus: IGpu[];
}

export interface IPool {
  agents: IAgent[];
  mode?: string;
}

export interface ISession {
  session: string;
  user?: string | null;
  attached?: boolean;
  fraction?: number | null;
  memory?: number | null;
  swapped?: boolean | number | null;
  notebook?: string | null;
  agent?: { id?: string | null; address?: string | null } | null;
}

/** `GET usage`: seconds per user (a number), or richer per-user objects. */
export interface IUsage {
  users: { [name: string]: number | IUserUsage };
  groups?: { [name: string]: number };
  since?: string | number | null;
  limits?: { [name: string]: number | null };
}

export interface IUserUsage {
  gpu_seconds?: number;
  gpu_seconds_today?: number;
  limit?: number | null;
  in_use?: number | null;
}

export interface IKernelGpuState {
  kernel_id: string;
  gpu: boolean;
  fraction: number | null;
  state: 'idle' | 'attached' | 'waiting';
  position?: number | null;
  reason?: string | null;
  swapped?: boolean;
}

/* ------------------------------------------------------------------ formatting */

/** `0.5` -> "0.5", `2` -> "2", `0.333333` -> "0.33". */
export function formatFraction(f: number | null | undefined): string {
  if (f === null || f === undefined || !isFinite(f)) {
    return '—';
  }
  return String(Math.round(f * 100) / 100);
}

/** Bytes in binary units: 1536 -> "1.5 KiB"; 80 * 2**30 -> "80 GiB". */
export function formatBytes(n: number | null | undefined): string {
  if (n === null || n === undefined || !isFinite(n) || n < 0) {
    return '—';
  }
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  const digits = i === 0 || v >= 100 ? 0 : v >= 10 ? 1 : 2;
  const text = v.toFixed(digits).replace(/\.0+$/, '').replace(/(\.\d*?)0+$/, '$1');
  return `${text} ${units[i]}`;
}

/** ISO string or unix seconds -> milliseconds since the epoch (or null). */
export function toMillis(t: string | number | null | undefined): number | null {
  if (t === null || t === undefined || t === '') {
    return null;
  }
  if (typeof t === 'number') {
    // Seconds (the broker) vs milliseconds (anything above year ~5000 in seconds).
    return t < 1e11 ? t * 1000 : t;
  }
  const ms = Date.parse(t);
  return isNaN(ms) ? null : ms;
}

/** A short "how long ago": "just now", "42 s", "5 min", "2 h 3 min", "3 d". */
export function formatDuration(ms: number): string {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 5) {
    return 'just now';
  }
  if (s < 60) {
    return `${s} s`;
  }
  const m = Math.floor(s / 60);
  if (m < 60) {
    return `${m} min`;
  }
  const h = Math.floor(m / 60);
  if (h < 24) {
    return m % 60 ? `${h} h ${m % 60} min` : `${h} h`;
  }
  return `${Math.floor(h / 24)} d`;
}

export function formatSince(t: string | number | null | undefined, now: number): string {
  const ms = toMillis(t);
  if (ms === null) {
    return '—';
  }
  const d = formatDuration(now - ms);
  return d === 'just now' ? d : `${d} ago`;
}

/** GPU-seconds -> "1.25 GPU-h". */
export function formatGpuHours(seconds: number | null | undefined): string {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) {
    return '—';
  }
  const h = seconds / 3600;
  const digits = h === 0 ? 0 : h < 10 ? 2 : 1;
  return `${h.toFixed(digits)} GPU-h`;
}

/** Last path component of a notebook path ("a/b/train.ipynb" -> "train.ipynb"). */
export function baseName(path: string): string {
  const parts = path.split('/').filter(p => p.length > 0);
  return parts.length ? parts[parts.length - 1] : path;
}

/* ------------------------------------------------------------------ quota bar */

export interface IQuotaBar {
  /** Share of the limit in use, 0..100 (clamped). */
  percent: number;
  /** "0.75 of 1 GPU in use", "1.5 GPUs in use (no limit)". */
  text: string;
  /** For the bar's colour: ok < 75 % <= warn < 100 % <= full. */
  level: 'ok' | 'warn' | 'full';
  unlimited: boolean;
}

function gpus(n: number): string {
  return `${formatFraction(n)} ${n === 1 ? 'GPU' : 'GPUs'}`;
}

export function quotaBar(limit: number | null | undefined, inUse: number | null | undefined): IQuotaBar {
  const used = inUse && isFinite(inUse) && inUse > 0 ? inUse : 0;
  if (limit === null || limit === undefined || !isFinite(limit)) {
    return {
      percent: used > 0 ? 100 : 0,
      text: `${gpus(used)} in use (no limit)`,
      level: 'ok',
      unlimited: true
    };
  }
  const percent = limit > 0 ? Math.min(100, Math.max(0, (used / limit) * 100)) : used > 0 ? 100 : 0;
  const level = percent >= 100 ? 'full' : percent >= 75 ? 'warn' : 'ok';
  return {
    percent: Math.round(percent * 10) / 10,
    text: `${formatFraction(used)} of ${gpus(limit)} in use`,
    level,
    unlimited: false
  };
}

/* ------------------------------------------------------------------ leases */

export type LeaseState = 'attached' | 'waiting' | 'idle';

export interface ILeaseRow {
  key: string;
  name: string;
  title: string;
  fraction: string;
  gpu: string;
  since: string;
  state: LeaseState;
  stateText: string;
  blockedBy: string;
}

export function leaseName(lease: ILease): string {
  if (lease.notebook) {
    return baseName(lease.notebook);
  }
  if (lease.kernel_name) {
    return lease.kernel_name;
  }
  if (lease.session) {
    return `kernel ${lease.session.slice(0, 8)}`;
  }
  return `lease ${String(lease.id).slice(0, 8)}`;
}

export function leaseState(lease: ILease): LeaseState {
  if (lease.state === 'granted') {
    return 'attached';
  }
  if (lease.state === 'queued') {
    return 'waiting';
  }
  return 'idle';
}

export function waitingText(position: number | null | undefined, reason?: string | null): string {
  const pos = position ? `#${position}` : '';
  const why = reason === 'quota' ? 'your limit' : reason === 'pool' ? 'pool full' : '';
  const inner = [pos, why].filter(x => x).join(', ');
  return inner ? `waiting (${inner})` : 'waiting';
}

export function gpuText(lease: ILease): string {
  const agent = lease.agent?.id || lease.agent?.address || '';
  const idx = lease.gpus && lease.gpus.length ? `GPU ${lease.gpus.join(',')}` : '';
  return [agent, idx].filter(x => x).join(' · ') || '—';
}

export function blockedByText(blockers: IBlocker[] | null | undefined): string {
  if (!blockers || !blockers.length) {
    return '';
  }
  return blockers
    .map(b => {
      const who = b.notebook ? baseName(b.notebook) : b.session ? `kernel ${b.session.slice(0, 8)}` : 'another kernel';
      return b.fraction !== null && b.fraction !== undefined ? `${who} (${formatFraction(b.fraction)})` : who;
    })
    .join(', ');
}

export function leaseRow(lease: ILease, now: number): ILeaseRow {
  const state = leaseState(lease);
  const name = leaseName(lease);
  return {
    key: String(lease.id),
    name,
    title: lease.notebook || lease.kernel_name || lease.session || String(lease.id),
    fraction: formatFraction(lease.fraction),
    gpu: state === 'attached' ? gpuText(lease) : '—',
    since: formatSince(state === 'attached' ? lease.granted_at ?? lease.created : lease.created, now),
    state,
    stateText: state === 'waiting' ? waitingText(lease.position, lease.reason) : state,
    blockedBy: state === 'waiting' ? blockedByText(lease.blocked_by) : ''
  };
}

/** Granted leases first, then the queue by position; ended leases dropped; unique keys. */
export function leaseRows(me: Pick<IMe, 'leases' | 'queue'> | null, now: number): ILeaseRow[] {
  if (!me) {
    return [];
  }
  const seen = new Set<string>();
  const all = [...(me.leases || []), ...(me.queue || [])].filter(l => {
    if (!l || l.state === 'ended' || seen.has(String(l.id))) {
      return false;
    }
    seen.add(String(l.id));
    return true;
  });
  const rank = (l: ILease) => (l.state === 'granted' ? 0 : 1);
  all.sort((a, b) => rank(a) - rank(b) || (a.position ?? 0) - (b.position ?? 0));
  return all.map(l => leaseRow(l, now));
}

/* ------------------------------------------------------------------ idle sessions */

export interface ISessionRow {
  key: string;
  name: string;
  fraction: string;
  memory: string;
  where: 'host' | 'GPU';
  agent: string;
}

/** My sessions that are not attached to a GPU right now (their tensors may be on the host). */
export function idleSessionRows(sessions: ISession[] | null | undefined): ISessionRow[] {
  if (!sessions) {
    return [];
  }
  return sessions
    .filter(s => s && !s.attached)
    .map(s => ({
      key: `${s.agent?.id ?? ''}/${s.session}`,
      name: s.notebook ? baseName(s.notebook) : `kernel ${String(s.session).slice(0, 8)}`,
      fraction: formatFraction(s.fraction),
      memory: formatBytes(s.memory),
      where: s.swapped ? ('host' as const) : ('GPU' as const),
      agent: s.agent?.id || s.agent?.address || ''
    }));
}

/* ------------------------------------------------------------------ pool */

export interface ISliceCell {
  key: string;
  fraction: number;
  label: string;
  /** Width share of the GPU, 0..100. */
  percent: number;
  mine: boolean;
}

export interface IGpuRow {
  key: string;
  label: string;
  name: string;
  used: string;
  slices: ISliceCell[];
  utilization: string;
  utilizationPercent: number | null;
  memory: string;
  memoryPercent: number | null;
}

export interface IAgentRow {
  key: string;
  name: string;
  device: string;
  alive: boolean;
  gpus: IGpuRow[];
}

/** Names appear only when the API returns them (admins, or the caller's own slices). */
export function sliceLabel(s: ISlice, me: string | null): string {
  const frac = formatFraction(s.fraction);
  if (s.user) {
    return `${frac} · ${me && s.user === me ? `${s.user} (you)` : s.user}`;
  }
  return `${frac} · in use`;
}

export function gpuRow(agentId: string, g: IGpu, me: string | null): IGpuRow {
  const slices = (g.slices || []).filter(s => s && s.fraction > 0);
  const usedTotal = slices.reduce((a, s) => a + s.fraction, 0);
  const cells = slices.map((s, i) => ({
    key: s.lease ? String(s.lease) : `${i}`,
    fraction: s.fraction,
    label: sliceLabel(s, me),
    percent: Math.min(100, Math.max(0, s.fraction * 100)),
    mine: !!me && s.user === me
  }));
  const util = g.utilization;
  const total = g.memory_total;
  const usedMem = g.memory_used;
  const memPct = total && usedMem !== null && usedMem !== undefined && total > 0 ? Math.min(100, (usedMem / total) * 100) : null;
  return {
    key: `${agentId}/${g.uuid || g.index}`,
    label: `GPU ${g.index}`,
    name: g.name || 'GPU',
    used: `${formatFraction(usedTotal)} of 1 in use`,
    slices: cells,
    utilization: util === null || util === undefined ? '—' : `${Math.round(util)}%`,
    utilizationPercent: util === null || util === undefined ? null : Math.min(100, Math.max(0, util)),
    memory: total ? `${formatBytes(usedMem ?? 0)} / ${formatBytes(total)}` : '—',
    memoryPercent: memPct === null ? null : Math.round(memPct * 10) / 10
  };
}

export function poolRows(pool: IPool | null, me: string | null): IAgentRow[] {
  if (!pool || !pool.agents) {
    return [];
  }
  return pool.agents.map(a => ({
    key: String(a.id),
    name: String(a.id),
    device: a.device || '',
    alive: a.alive !== false,
    gpus: (a.gpus || []).map(g => gpuRow(String(a.id), g, me))
  }));
}

/* ------------------------------------------------------------------ admin: users */

export interface IUserRow {
  key: string;
  user: string;
  limit: string;
  inUse: string;
  hours: string;
}

/**
 * Per-user rows for admins: usage (GPU-seconds) joined with everyone's live leases
 * (`leases?all=true`) for "in use". Sorted by name.
 */
export function userRows(usage: IUsage | null, allLeases: ILease[] | null): IUserRow[] {
  const inUse = new Map<string, number>();
  for (const l of allLeases || []) {
    if (l && l.user && l.state === 'granted') {
      inUse.set(l.user, (inUse.get(l.user) || 0) + l.fraction);
    }
  }
  const names = new Set<string>([...Object.keys(usage?.users || {}), ...inUse.keys()]);
  return [...names].sort().map(user => {
    const u = usage?.users?.[user];
    const rich = typeof u === 'object' && u !== null ? u : null;
    const secs = rich ? rich.gpu_seconds_today ?? rich.gpu_seconds ?? 0 : typeof u === 'number' ? u : 0;
    const limit = rich?.limit ?? usage?.limits?.[user] ?? null;
    const using = rich?.in_use ?? inUse.get(user) ?? 0;
    return {
      key: user,
      user,
      limit: limit === null || limit === undefined ? '—' : formatFraction(limit),
      inUse: formatFraction(using),
      hours: formatGpuHours(secs)
    };
  });
}

/* ------------------------------------------------------------------ status bar */

/** "GPU 0.5 · idle" / "GPU 0.5 · attached" / "GPU 0.5 · waiting (#2)". */
export function statusText(fraction: number | null | undefined, state: IKernelGpuState | null, error?: boolean): string {
  const head = `GPU ${formatFraction(fraction)}`;
  if (error) {
    return `${head} · unavailable`;
  }
  if (!state) {
    return head;
  }
  if (state.state === 'waiting') {
    return `${head} · ${state.position ? `waiting (#${state.position})` : 'waiting'}`;
  }
  return `${head} · ${state.state}`;
}

/** The fraction of a GPU kernelspec, or null when it is not an elastic-GPU kernel. Without
 * `config.gpu` the provisioner leases one GPU (its default), so that is the fraction; the
 * server extension's `kernels/{id}` answer, read with the same rule, has the last word. */
export function gpuFractionFromSpec(metadata: unknown): number | null {
  if (!metadata || typeof metadata !== 'object') {
    return null;
  }
  const prov = (metadata as { [k: string]: unknown })['kernel_provisioner'];
  if (!prov || typeof prov !== 'object') {
    return null;
  }
  const p = prov as { provisioner_name?: unknown; config?: { gpu?: unknown } };
  if (p.provisioner_name !== 'elastic-gpu-provisioner') {
    return null;
  }
  const gpu = Number(p.config?.gpu ?? 1);
  return isFinite(gpu) && gpu > 0 ? gpu : null;
}

/* ------------------------------------------------------------------ polling */

export const POLL_MIN_MS = 2000;
export const POLL_MAX_MS = 30000;

/** Next poll delay after `failures` consecutive errors: 2 s, 4 s, 8 s, 16 s, 30 s, 30 s... */
export function pollDelay(failures: number, min = POLL_MIN_MS, max = POLL_MAX_MS): number {
  if (failures <= 0) {
    return min;
  }
  return Math.min(max, min * Math.pow(2, Math.min(failures, 16)));
}

/** "GPU broker unreachable — retrying in 8s". */
export function unreachableText(mode: string | undefined, retryInMs: number): string {
  const what = mode === 'agent' ? 'GPU agent' : 'GPU broker';
  const s = Math.max(0, Math.ceil(retryInMs / 1000));
  return `${what} unreachable — retrying in ${s}s`;
}
