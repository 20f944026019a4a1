// The status-bar item and the panel. Text goes in with textContent only: paths and error
// messages come from the bucket and must never be parsed as HTML.
import { Widget } from '@lumino/widgets';

import { Progress, Snapshot, SyncSummary } from './api';
import { ago, bytes, clock, headline, lastRuns, verb } from './format';
import { SidecarModel } from './model';

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  text = '',
  className = ''
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (text) {
    node.textContent = text;
  }
  if (className) {
    node.className = className;
  }
  return node;
}

function table(headers: string[], rows: string[][]): HTMLTableElement {
  const node = el('table');
  const head = node.createTHead().insertRow();
  for (const header of headers) {
    head.appendChild(el('th', header));
  }
  const body = node.createTBody();
  for (const row of rows) {
    const tr = body.insertRow();
    for (const cell of row) {
      tr.insertCell().textContent = cell;
    }
  }
  return node;
}

function now(): number {
  return Date.now() / 1000;
}

export class StatusItem extends Widget {
  constructor(
    private model: SidecarModel,
    open: () => void
  ) {
    super({ node: el('div', 'sync: …', 'nv-status-item') });
    this.node.title = 'Volume sync (netvol-sidecar): click for details, Pull and Push';
    this.node.addEventListener('click', open);
    model.onChange(() => this.render());
  }

  render(): void {
    const snapshot = this.model.snapshot;
    if (!snapshot) {
      return;
    }
    const { text, tone } = headline(snapshot, now());
    this.node.textContent = `sync: ${text}`;
    this.node.classList.toggle('nv-problem', tone === 'problem');
    this.node.classList.toggle('nv-down', tone === 'down');
    this.node.dataset.tone = tone;
  }
}

export class SyncPanel extends Widget {
  private state = el('div', '', 'nv-state');
  private progress = el('div', '', 'nv-progress');
  private message = el('div', '', 'nv-message');
  private details = el('div');
  private pullButton = el('button', 'Pull', 'jp-mod-styled nv-pull');
  private pushButton = el('button', 'Push', 'jp-mod-styled jp-mod-accept nv-push');

  constructor(private model: SidecarModel) {
    super();
    this.id = 'netvol-sidecar-panel';
    this.addClass('nv-panel');
    this.title.label = 'Volume sync';
    this.title.closable = true;
    this.pullButton.title = 'Bring the bucket\u2019s changes into this folder';
    this.pushButton.title = 'Send this folder\u2019s changes to the bucket now';
    this.pullButton.addEventListener('click', () => void model.sync('pull'));
    this.pushButton.addEventListener('click', () => void model.sync('finalize'));
    const buttons = el('div', '', 'nv-buttons');
    buttons.append(this.pullButton, this.pushButton);
    this.node.append(el('h2', 'Volume sync'), this.state, buttons, this.progress, this.message);
    this.node.append(this.details);
    model.onChange(() => this.render());
  }

  render(): void {
    const snapshot = this.model.snapshot;
    this.message.textContent = this.model.message;
    if (!snapshot) {
      return;
    }
    const { text } = headline(snapshot, now());
    this.state.textContent = text.charAt(0).toUpperCase() + text.slice(1);
    this.details.replaceChildren();
    this.progress.replaceChildren();
    if (!snapshot.reachable) {
      this.pullButton.disabled = this.pushButton.disabled = true;
      this.details.append(el('p', snapshot.error, 'nv-muted'));
      return;
    }
    const status = snapshot.status;
    this.pullButton.disabled = status.shutting_down;
    this.pushButton.disabled = status.read_only || status.shutting_down || !status.ready;
    if (status.current) {
      this.renderProgress(snapshot);
    }
    this.renderDetails(snapshot);
  }

  private renderProgress(snapshot: Snapshot & { reachable: true }): void {
    const current = snapshot.status.current!;
    const bar = el('progress');
    bar.max = Math.max(1, current.bytes_total);
    bar.value = current.bytes_done;
    const eta = current.eta_seconds === null ? '' : `, ETA ${clock(current.eta_seconds)}`;
    const line =
      `${verb(current.operation)} (${current.phase}): ` +
      (walkCounts(current) ??
        `${current.files_done}/${current.files_total} files, ` +
          `${bytes(current.bytes_done)}/${bytes(current.bytes_total)}, ` +
          `${bytes(current.rate_bytes_per_second)}/s${eta}`);
    this.progress.append(bar, el('div', line));
  }

  private renderDetails(snapshot: Snapshot & { reachable: true }): void {
    const status = snapshot.status;
    const where = status.volume ? `${status.volume} \u2194 ${status.remote ?? ''}` : status.remote;
    if (where) {
      this.details.append(el('div', where, 'nv-muted'));
    }
    for (const [op, title] of [
      ['pull', 'Last pull'],
      ['finalize', 'Last push']
    ] as const) {
      this.details.append(el('h3', title));
      const result = status.last_results[op];
      this.details.append(el('div', result ? describe(result) : 'none yet', 'nv-muted'));
    }
    const runs = lastRuns(status);
    const conflicts = runs.flatMap(r => r.conflicts);
    if (conflicts.length) {
      this.details.append(el('h3', 'Conflicts'));
      this.details.append(
        table(
          ['path', 'other version kept as', 'what happened'],
          conflicts.map(c => [c.path, c.copy ?? '\u2014', c.resolution])
        )
      );
    }
    const errors = runs.flatMap(r => r.errors.map(e => [e.path, `${r.operation}: ${e.reason}`]));
    for (const skipped of status.degraded_by?.skipped ?? []) {
      errors.push([skipped.path, `left out: ${skipped.reason}`]);
    }
    if (errors.length) {
      this.details.append(el('h3', 'Errors by path'));
      this.details.append(table(['path', 'cause'], errors));
    }
    if (status.degraded_by?.deletes_withheld) {
      this.details.append(el('h3', 'Deletes withheld'));
      this.details.append(el('div', status.degraded_by.deletes_withheld));
    }
    if (status.last_error) {
      this.details.append(el('h3', 'Last error'));
      this.details.append(
        el('div', `${status.last_error.message} (${ago(now() - status.last_error.at)})`)
      );
    }
  }
}

/** While the walk runs nothing is counted in files/bytes yet: what it has seen so far. */
function walkCounts(current: Progress): string | null {
  if (current.phase !== 'scanning' || current.paths_compared === undefined) {
    return null;
  }
  return (
    `${current.files_scanned} files in the folder, ${current.objects_listed} objects listed, ` +
    `${current.paths_compared} paths compared`
  );
}

function describe(result: SyncSummary): string {
  const when = ago(Date.now() / 1000 - result.finished_at);
  const moved =
    `${result.files_transferred} file${result.files_transferred === 1 ? '' : 's'} ` +
    `(${bytes(result.bytes_transferred)}), ${result.files_deleted} deleted, ` +
    `${result.conflicts.length} conflicts, ${result.errors.length} errors`;
  const outcome = result.ok ? result.outcome : `failed: ${result.fatal ?? 'see errors'}`;
  return `${when}: ${outcome}, ${moved}, ${result.seconds.toFixed(1)} s`;
}
