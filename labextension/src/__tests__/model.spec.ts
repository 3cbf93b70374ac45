import {
  ILease,
  IMe,
  IPool,
  blockedByText,
  formatBytes,
  formatFraction,
  formatGpuHours,
  formatSince,
  gpuFractionFromSpec,
  gpuRow,
  idleSessionRows,
  leaseRow,
  leaseRows,
  pollDelay,
  poolRows,
  quotaBar,
  statusText,
  toMillis,
  unreachableText,
  userRows,
  waitingText
} from '../model';

const NOW = Date.parse('2025-01-01T12:00:00Z');

function lease(over: Partial<ILease>): ILease {
  return {
    id: 'l1',
    user: 'alice',
    session: 'k-1234567890',
    kernel_name: 'python3-gpu-0.5',
    notebook: 'work/train.ipynb',
    fraction: 0.5,
    state: 'granted',
    blocked_by: [],
    agent: { id: 'gpu-node-1', address: '10.0.0.5:7070' },
    gpus: [0],
    created: '2025-01-01T11:55:00Z',
    granted_at: '2025-01-01T11:58:00Z',
    ...over
  };
}

describe('formatting', () => {
  it('formats fractions', () => {
    expect(formatFraction(0.5)).toBe('0.5');
    expect(formatFraction(0.25)).toBe('0.25');
    expect(formatFraction(2)).toBe('2');
    expect(formatFraction(1 / 3)).toBe('0.33');
    expect(formatFraction(null)).toBe('—');
    expect(formatFraction(NaN)).toBe('—');
  });

  it('formats bytes in binary units', () => {
    expect(formatBytes(0)).toBe('0 B');
    expect(formatBytes(512)).toBe('512 B');
    expect(formatBytes(1536)).toBe('1.5 KiB');
    expect(formatBytes(80 * 2 ** 30)).toBe('80 GiB');
    expect(formatBytes(81559 * 2 ** 20)).toBe('79.6 GiB');
    expect(formatBytes(1.25 * 2 ** 30)).toBe('1.25 GiB');
    expect(formatBytes(2 ** 50 * 3)).toBe('3 PiB');
    expect(formatBytes(undefined)).toBe('—');
    expect(formatBytes(-1)).toBe('—');
  });

  it('parses times as ISO strings or unix seconds', () => {
    expect(toMillis('2025-01-01T12:00:00Z')).toBe(NOW);
    expect(toMillis(NOW / 1000)).toBe(NOW);
    expect(toMillis(NOW)).toBe(NOW);
    expect(toMillis(null)).toBeNull();
    expect(toMillis('not a date')).toBeNull();
  });

  it('formats "since"', () => {
    expect(formatSince(NOW - 2000, NOW)).toBe('just now');
    expect(formatSince(NOW - 42_000, NOW)).toBe('42 s ago');
    expect(formatSince((NOW - 5 * 60_000) / 1000, NOW)).toBe('5 min ago');
    expect(formatSince(NOW - (2 * 60 + 3) * 60_000, NOW)).toBe('2 h 3 min ago');
    expect(formatSince(NOW - 3 * 86400_000, NOW)).toBe('3 d ago');
    expect(formatSince(null, NOW)).toBe('—');
  });

  it('formats GPU-hours', () => {
    expect(formatGpuHours(0)).toBe('0 GPU-h');
    expect(formatGpuHours(4500)).toBe('1.25 GPU-h');
    expect(formatGpuHours(36000 * 1.5)).toBe('15.0 GPU-h');
  });
});

describe('quotaBar', () => {
  it('computes the share of the limit', () => {
    expect(quotaBar(1, 0.5)).toEqual({
      percent: 50,
      text: '0.5 of 1 GPU in use',
      level: 'ok',
      unlimited: false
    });
    expect(quotaBar(2, 1.5).level).toBe('warn');
    expect(quotaBar(2, 1.5).text).toBe('1.5 of 2 GPUs in use');
    expect(quotaBar(1, 1).level).toBe('full');
  });

  it('clamps and handles missing data', () => {
    expect(quotaBar(1, 3).percent).toBe(100);
    expect(quotaBar(1, -1).percent).toBe(0);
    expect(quotaBar(0, 0).percent).toBe(0);
    expect(quotaBar(0, 0.25).level).toBe('full');
    const unl = quotaBar(null, 0.75);
    expect(unl.unlimited).toBe(true);
    expect(unl.text).toBe('0.75 GPUs in use (no limit)');
  });
});

describe('leases', () => {
  it('maps a granted lease to an attached row', () => {
    const row = leaseRow(lease({}), NOW);
    expect(row).toEqual({
      key: 'l1',
      name: 'train.ipynb',
      title: 'work/train.ipynb',
      fraction: '0.5',
      gpu: 'gpu-node-1 · GPU 0',
      since: '2 min ago',
      state: 'attached',
      stateText: 'attached',
      blockedBy: ''
    });
  });

  it('maps a queued lease to waiting with its position and blockers', () => {
    const row = leaseRow(
      lease({
        id: 'l2',
        state: 'queued',
        position: 2,
        reason: 'quota',
        agent: null,
        gpus: [],
        granted_at: null,
        blocked_by: [
          { id: 'l1', session: 'k-1', notebook: 'a/other.ipynb', fraction: 0.5 },
          { id: 'l9', session: 'abcdef0123456', notebook: null, fraction: null }
        ]
      }),
      NOW
    );
    expect(row.state).toBe('waiting');
    expect(row.stateText).toBe('waiting (#2, your limit)');
    expect(row.gpu).toBe('—');
    expect(row.since).toBe('5 min ago');
    expect(row.blockedBy).toBe('other.ipynb (0.5), kernel abcdef01');
  });

  it('names leases without a notebook', () => {
    expect(leaseRow(lease({ notebook: null }), NOW).name).toBe('python3-gpu-0.5');
    expect(leaseRow(lease({ notebook: null, kernel_name: null }), NOW).name).toBe(
      'kernel k-123456'
    );
  });

  it('orders granted first, then the queue, and drops ended/duplicate leases', () => {
    const me: Pick<IMe, 'leases' | 'queue'> = {
      leases: [lease({ id: 'a' }), lease({ id: 'z', state: 'ended' })],
      queue: [
        lease({ id: 'q3', state: 'queued', position: 3 }),
        lease({ id: 'q1', state: 'queued', position: 1 }),
        lease({ id: 'a' })
      ]
    };
    expect(leaseRows(me, NOW).map(r => r.key)).toEqual(['a', 'q1', 'q3']);
    expect(leaseRows(null, NOW)).toEqual([]);
  });

  it('texts for waiting', () => {
    expect(waitingText(2, 'pool')).toBe('waiting (#2, pool full)');
    expect(waitingText(null, null)).toBe('waiting');
    expect(blockedByText(undefined)).toBe('');
  });
});

describe('idle sessions', () => {
  it('lists only unattached sessions, marking swapped ones', () => {
    const rows = idleSessionRows([
      { session: 's1', attached: true, fraction: 0.5, memory: 100 },
      {
        session: 's2-abcdefgh',
        attached: false,
        swapped: true,
        fraction: 0.25,
        memory: 3 * 2 ** 30,
        agent: { id: 'n1' }
      },
      { session: 's3', attached: false, swapped: false, fraction: 1, notebook: 'x/y.ipynb' }
    ]);
    expect(rows).toEqual([
      {
        key: 'n1/s2-abcdefgh',
        name: 'kernel s2-abcde',
        fraction: '0.25',
        memory: '3 GiB',
        where: 'host',
        agent: 'n1'
      },
      { key: '/s3', name: 'y.ipynb', fraction: '1', memory: '—', where: 'GPU', agent: '' }
    ]);
    expect(idleSessionRows(null)).toEqual([]);
  });
});

describe('pool', () => {
  const pool: IPool = {
    agents: [
      {
        id: 'node-1',
        device: 'cuda',
        alive: true,
        gpus: [
          {
            index: 0,
            uuid: 'GPU-aaa',
            name: 'NVIDIA H100',
            memory_total: 80 * 2 ** 30,
            memory_used: 20 * 2 ** 30,
            utilization: 37.4,
            free: 0.25,
            slices: [
              { lease: 'l1', fraction: 0.5, user: 'alice' },
              { lease: 'l2', fraction: 0.25, user: null }
            ]
          }
        ]
      },
      { id: 'node-2', alive: false, gpus: [{ index: 0, name: null, slices: [] }] }
    ]
  };

  it('maps agents and GPUs', () => {
    const rows = poolRows(pool, 'alice');
    expect(rows.map(r => [r.key, r.alive])).toEqual([
      ['node-1', true],
      ['node-2', false]
    ]);
    const g = rows[0].gpus[0];
    expect(g.key).toBe('node-1/GPU-aaa');
    expect(g.label).toBe('GPU 0');
    expect(g.used).toBe('0.75 of 1 in use');
    expect(g.utilization).toBe('37%');
    expect(g.memory).toBe('20 GiB / 80 GiB');
    expect(g.memoryPercent).toBe(25);
    expect(g.slices).toEqual([
      { key: 'l1', fraction: 0.5, label: '0.5 · alice (you)', percent: 50, mine: true },
      { key: 'l2', fraction: 0.25, label: '0.25 · in use', percent: 25, mine: false }
    ]);
    const g2 = rows[1].gpus[0];
    expect(g2.name).toBe('GPU');
    expect(g2.utilization).toBe('—');
    expect(g2.memory).toBe('—');
    expect(g2.memoryPercent).toBeNull();
  });

  it('never invents names the API did not return', () => {
    const g = gpuRow('n', { index: 1, slices: [{ lease: 'x', fraction: 1, user: null }] }, 'bob');
    expect(g.slices[0].label).toBe('1 · in use');
    expect(JSON.stringify(g)).not.toContain('alice');
  });

  it('shows other users only when the API names them (admin)', () => {
    const g = gpuRow('n', { index: 0, slices: [{ lease: 'x', fraction: 2, user: 'carol' }] }, 'root');
    expect(g.slices[0].label).toBe('2 · carol');
    expect(g.slices[0].percent).toBe(100);
  });

  it('handles an empty pool', () => {
    expect(poolRows(null, null)).toEqual([]);
    expect(poolRows({ agents: [] }, null)).toEqual([]);
  });
});

describe('admin users', () => {
  it('joins usage with live leases', () => {
    const rows = userRows(
      { users: { alice: 4500, bob: { gpu_seconds: 7200, limit: 2, in_use: 1 } }, limits: { alice: 1 } },
      [
        lease({ id: '1', user: 'alice', fraction: 0.5 }),
        lease({ id: '2', user: 'alice', fraction: 0.25 }),
        lease({ id: '3', user: 'carol', fraction: 1 }),
        lease({ id: '4', user: 'carol', fraction: 1, state: 'queued' })
      ]
    );
    expect(rows).toEqual([
      { key: 'alice', user: 'alice', limit: '1', inUse: '0.75', hours: '1.25 GPU-h' },
      { key: 'bob', user: 'bob', limit: '2', inUse: '1', hours: '2.00 GPU-h' },
      { key: 'carol', user: 'carol', limit: '—', inUse: '1', hours: '0 GPU-h' }
    ]);
    expect(userRows(null, null)).toEqual([]);
  });
});

describe('status bar', () => {
  const st = (state: 'idle' | 'attached' | 'waiting', position?: number) => ({
    kernel_id: 'k',
    gpu: true,
    fraction: 0.5,
    state,
    position
  });

  it('renders the kernel state', () => {
    expect(statusText(0.5, st('idle'))).toBe('GPU 0.5 · idle');
    expect(statusText(0.5, st('attached'))).toBe('GPU 0.5 · attached');
    expect(statusText(0.5, st('waiting', 2))).toBe('GPU 0.5 · waiting (#2)');
    expect(statusText(0.5, st('waiting'))).toBe('GPU 0.5 · waiting');
    expect(statusText(0.25, null)).toBe('GPU 0.25');
    expect(statusText(1, st('idle'), true)).toBe('GPU 1 · unavailable');
  });

  it('reads the fraction from kernelspec metadata', () => {
    expect(
      gpuFractionFromSpec({
        kernel_provisioner: { provisioner_name: 'elastic-gpu-provisioner', config: { gpu: 0.5 } }
      })
    ).toBe(0.5);
    expect(
      gpuFractionFromSpec({
        kernel_provisioner: { provisioner_name: 'elastic-gpu-provisioner', config: { gpu: '2' } }
      })
    ).toBe(2);
    expect(
      gpuFractionFromSpec({
        kernel_provisioner: { provisioner_name: 'local-provisioner', config: { gpu: 0.5 } }
      })
    ).toBeNull();
    // No config.gpu: the provisioner's default of one GPU, as the Python reader says.
    expect(gpuFractionFromSpec({ kernel_provisioner: { provisioner_name: 'elastic-gpu-provisioner' } })).toBe(1);
    expect(
      gpuFractionFromSpec({
        kernel_provisioner: { provisioner_name: 'elastic-gpu-provisioner', config: { gpu: 'x' } }
      })
    ).toBeNull();
    expect(gpuFractionFromSpec({})).toBeNull();
    expect(gpuFractionFromSpec(undefined)).toBeNull();
  });
});

describe('polling', () => {
  it('backs off from 2 s to 30 s on errors', () => {
    expect([0, 1, 2, 3, 4, 5, 50].map(n => pollDelay(n))).toEqual([
      2000, 4000, 8000, 16000, 30000, 30000, 30000
    ]);
  });

  it('says what is unreachable and when it retries', () => {
    expect(unreachableText('broker', 7200)).toBe('GPU broker unreachable — retrying in 8s');
    expect(unreachableText(undefined, 0)).toBe('GPU broker unreachable — retrying in 0s');
    expect(unreachableText('agent', 30000)).toBe('GPU agent unreachable — retrying in 30s');
  });
});
