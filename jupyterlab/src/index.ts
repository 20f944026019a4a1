// netvol-sidecar for JupyterLab: a status-bar item with the volume's sync state at a glance,
// and a panel (opened from it) with the last results, conflicts, errors and Pull / Push.
import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { IStatusBar } from '@jupyterlab/statusbar';

import { SidecarModel } from './model';
import { StatusItem, SyncPanel } from './widgets';

const OPEN = 'netvol-sidecar:open';

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'netvol-sidecar:plugin',
  description: 'Sync status of the notebook volume, with Pull and Push.',
  autoStart: true,
  requires: [IStatusBar],
  activate: (app: JupyterFrontEnd, statusBar: IStatusBar) => {
    const model = new SidecarModel();
    let panel: SyncPanel | null = null;
    app.commands.addCommand(OPEN, {
      label: 'Volume sync',
      caption: 'Sync state of the notebook volume, with Pull and Push',
      execute: () => {
        if (!panel || panel.isDisposed) {
          panel = new SyncPanel(model);
          panel.render();
          app.shell.add(panel, 'right', { rank: 900 });
        }
        app.shell.activateById(panel.id);
      }
    });
    const item = new StatusItem(model, () => void app.commands.execute(OPEN));
    statusBar.registerStatusItem('netvol-sidecar:status', { item, align: 'left', rank: 100 });
    model.start();
  }
};

export default plugin;
