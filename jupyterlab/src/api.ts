// The sidecar as the browser sees it: the Jupyter server extension's routes
// (<base_url>/netvol-sidecar/...), which proxy the sidecar's control API behind Jupyter's
// login and XSRF protection. ServerConnection adds both to every request.
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

export interface Progress {
  operation: string;
  phase: string;
  files_done: number;
  files_total: number;
  bytes_done: number;
  bytes_total: number;
  rate_bytes_per_second: number;
  eta_seconds: number | null;
  elapsed_seconds: number;
  line: string;
  origin?: string;
  // The walk's counts (phase "scanning"), growing while it runs; absent from older daemons.
  files_scanned?: number;
  objects_listed?: number;
  paths_compared?: number;
  files_hashed?: number;
  objects_checked?: number;
}

export interface Conflict {
  path: string;
  kind: string;
  resolution: string;
  copy: string | null;
}

export interface FileError {
  path: string;
  reason: string;
}

export interface SyncSummary {
  operation: string;
  ok: boolean;
  dry_run: boolean;
  files_transferred: number;
  bytes_transferred: number;
  files_deleted: number;
  files_skipped: number;
  conflicts: Conflict[];
  errors: FileError[];
  deletes_blocked: string | null;
  fatal: string | null;
  seconds: number;
  finished_at: number;
  outcome: string;
  summary: string;
  origin?: string;
}

export interface Status {
  ready: boolean;
  degraded: boolean;
  degraded_by: { skipped?: FileError[]; skipped_count?: number; deletes_withheld?: string | null } | null;
  read_only: boolean;
  shutting_down: boolean;
  current: Progress | null;
  queued: { operation: string }[];
  last_results: Record<string, SyncSummary | undefined>;
  last_error: { operation: string; at: number; message: string } | null;
  volume?: string | null;
  remote?: string;
}

export type Snapshot =
  | { reachable: true; status: Status; at: number }
  | { reachable: false; error: string; at: number; proxied: boolean };

export interface Answer {
  code: number;
  body: Record<string, unknown> | null;
}

async function call(path: string, method: 'GET' | 'POST'): Promise<Answer> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'netvol-sidecar', path);
  // 'no-cache' (revalidate): the default 'no-store' makes ServerConnection append a bare
  // timestamp to the query string (the proxy drops it; the sidecar knows no such parameter).
  const response = await ServerConnection.makeRequest(
    url,
    { method, cache: 'no-cache' },
    settings
  );
  let body: Record<string, unknown> | null = null;
  try {
    body = (await response.json()) as Record<string, unknown>;
  } catch {
    body = null;
  }
  return { code: response.status, body };
}

export async function fetchSnapshot(): Promise<Snapshot> {
  const at = Date.now() / 1000;
  try {
    const answer = await call('status', 'GET');
    if (answer.code === 200 && answer.body) {
      return { reachable: true, status: answer.body as unknown as Status, at };
    }
    const error = answer.body?.error ?? answer.body?.message ?? `HTTP ${answer.code}`;
    // 502 is the proxy saying the sidecar does not answer; anything else came from it (or
    // from Jupyter: an expired login is a 403).
    return { reachable: false, error: String(error), at, proxied: answer.code !== 502 };
  } catch (reason) {
    const error = `Jupyter server unreachable: ${String(reason)}`;
    return { reachable: false, error, at, proxied: false };
  }
}

/** Start a pull or a push (finalize) and answer at once: progress comes from /status. */
export async function startSync(operation: 'pull' | 'finalize'): Promise<Answer> {
  return call(`${operation}?wait=false`, 'POST');
}
