"""The ServerApp: the round loop (:mod:`fedlora.federation.loop`) over Flower's Grid."""

from __future__ import annotations

import threading
import traceback

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.config.settings import Settings
from fedlora.flower.grid import GridTransport, NodeDirectory
from fedlora.flower.settings import resolve_settings
from fedlora.serving.run import serve, simulated_clients


def make_server_app(settings: Settings | None = None, stop: threading.Event | None = None,
                    directory: NodeDirectory | None = None) -> ServerApp:
    """Build the ServerApp; ``settings`` of the run (``None``: read them from the run config).

    ``stop`` is the run's stop event (simulation: set on Ctrl-C, SIGTERM or when the engine ends);
    ``directory`` (simulation) says which node holds which client, so not every node is greeted.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run = resolve_settings(settings, context.run_config)
        try:
            expected, greet = simulated_clients(run) if directory is not None else (None, 0)
            serve(run, GridTransport(grid, stop, directory=directory, expected_info=expected, greet=greet,
                                          num_rounds=run.loop.num_rounds), stop=stop)
        except Exception:
            if settings is None:  # deployment: no `fedlora` process around to record the failure
                run.run_dir.mkdir(parents=True, exist_ok=True)
                (run.run_dir / "FAILED").write_text(traceback.format_exc())
            raise

    return app


# Deployment entry point (`flwr run`): the config arrives in the run config.
app = make_server_app(None)
