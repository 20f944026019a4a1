// Polls the sidecar's status through the Jupyter server and tells the views.
import { fetchSnapshot, Snapshot, startSync } from './api';

const IDLE_POLL_MS = 3000;
const BUSY_POLL_MS = 1000; // while a sync runs: "live" progress

export class SidecarModel {
  snapshot: Snapshot | null = null;
  message = ''; // the answer to the last button press when it was not a start
  private listeners: (() => void)[] = [];
  private timer: number | undefined;
  private disposed = false;

  onChange(listener: () => void): void {
    this.listeners.push(listener);
  }

  start(): void {
    void this.refresh();
  }

  dispose(): void {
    this.disposed = true;
    window.clearTimeout(this.timer);
  }

  async refresh(): Promise<void> {
    window.clearTimeout(this.timer);
    this.snapshot = await fetchSnapshot();
    this.emit();
    if (!this.disposed) {
      const busy = this.snapshot.reachable && this.snapshot.status.current !== null;
      this.timer = window.setTimeout(() => void this.refresh(), busy ? BUSY_POLL_MS : IDLE_POLL_MS);
    }
  }

  async sync(operation: 'pull' | 'finalize'): Promise<void> {
    this.message = '';
    this.emit();
    try {
      const answer = await startSync(operation);
      if (answer.code >= 300) {
        const why = answer.body?.error ?? answer.body?.message ?? `HTTP ${answer.code}`;
        this.message = `${operation === 'finalize' ? 'Push' : 'Pull'} not started: ${String(why)}`;
      }
    } catch (reason) {
      this.message = `Request failed: ${String(reason)}`;
    }
    await this.refresh();
  }

  private emit(): void {
    for (const listener of this.listeners) {
      listener();
    }
  }
}
