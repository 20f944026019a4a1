// Pure text for the status item and the panel: no DOM, no requests.
import { Snapshot, Status, SyncSummary } from './api';

export type Tone = 'ok' | 'busy' | 'problem' | 'down';

export function verb(operation: string): string {
  return operation === 'finalize' ? 'pushing' : 'pulling';
}

export function clock(seconds: number): string {
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const rest = String(s % 60).padStart(2, '0');
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${rest}` : `${m}:${rest}`;
}

export function ago(seconds: number): string {
  if (seconds < 60) {
    return 'just now';
  }
  if (seconds < 3600) {
    return `${Math.floor(seconds / 60)} min ago`;
  }
  if (seconds < 86400) {
    return `${Math.floor(seconds / 3600)} h ago`;
  }
  return `${Math.floor(seconds / 86400)} d ago`;
}

export function bytes(count: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = count;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
}

/** The real (not dry-run) results of the last pull and push. */
export function lastRuns(status: Status): SyncSummary[] {
  return ['pull', 'finalize']
    .map(op => status.last_results[op])
    .filter((r): r is SyncSummary => r !== undefined);
}

/** Conflicts of the latest sync: a clean sync after them means they were dealt with (the
 * panel still lists those of the last pull and of the last push). */
export function conflictCount(status: Status): number {
  const runs = lastRuns(status).sort((a, b) => b.finished_at - a.finished_at);
  return runs.length ? runs[0].conflicts.length : 0;
}

export function lastSuccess(status: Status): number | null {
  const times = lastRuns(status)
    .filter(r => r.ok)
    .map(r => r.finished_at);
  return times.length ? Math.max(...times) : null;
}

/** One line at a glance: "synced 3 min ago", "pulling 43% ETA 1:20", "2 conflicts", ... */
export function headline(snapshot: Snapshot, now: number): { text: string; tone: Tone } {
  if (!snapshot.reachable) {
    const text = snapshot.proxied ? 'status unavailable' : 'sidecar unreachable';
    return { text, tone: 'down' };
  }
  const status = snapshot.status;
  const current = status.current;
  if (current) {
    let text = verb(current.operation);
    if (current.bytes_total > 0) {
      text += ` ${Math.floor((100 * current.bytes_done) / current.bytes_total)}%`;
      if (current.eta_seconds !== null) {
        text += ` ETA ${clock(current.eta_seconds)}`;
      }
    }
    return { text, tone: 'busy' };
  }
  if (!status.ready) {
    return status.last_error
      ? { text: 'initial pull failing', tone: 'problem' }
      : { text: 'initial pull waiting', tone: 'busy' };
  }
  const conflicts = conflictCount(status);
  if (conflicts > 0) {
    return { text: `${conflicts} conflict${conflicts === 1 ? '' : 's'}`, tone: 'problem' };
  }
  if (status.degraded) {
    return { text: 'degraded', tone: 'problem' };
  }
  const success = lastSuccess(status);
  if (status.last_error && (success === null || status.last_error.at > success)) {
    return { text: `${verb(status.last_error.operation).replace('ing', '')} failed`, tone: 'problem' };
  }
  return success === null
    ? { text: 'not synced yet', tone: 'ok' }
    : { text: `synced ${ago(now - success)}`, tone: 'ok' };
}
