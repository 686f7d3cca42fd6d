"""The Flower ServerApp: reads the run config, prepares the experiment and runs the rounds with
:class:`~fedsubspace.flower.strategy.SubspaceStrategy` (Flower's ``Strategy.start``), or under SecAgg+ with
:func:`~fedsubspace.flower.secagg_server.serve_secagg`; the results directory is the in-process runner's."""

from __future__ import annotations

from logging import ERROR

from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedsubspace.configure import build_method
from fedsubspace.errors import UserError, as_user_error
from fedsubspace.experiment import prepare
from fedsubspace.flower.payload import to_record
from fedsubspace.flower.secagg_server import serve_secagg
from fedsubspace.flower.settings import FlowerSettings
from fedsubspace.flower.strategy import SubspaceStrategy, info
from fedsubspace.results import FLOWER, PARTITION_STATS, RunDirectory, claim
from fedsubspace.server import done_line
from fedsubspace.state import flatten

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        settings = FlowerSettings.from_run_config(context.run_config)
        with claim(settings.out):
            serve(grid, settings, RunDirectory(settings.out, overwrite=settings.overwrite, runner=FLOWER))
    except (UserError, OSError) as exc:
        log(ERROR, "fedsubspace: error: %s", as_user_error(exc))
        raise


def serve(grid: Grid, settings: FlowerSettings, run_dir: RunDirectory) -> None:
    """The whole run, with ``settings.out`` held by this process."""
    config = settings.config
    run_dir.write_config(config.to_dict())
    exp = prepare(config)
    run_dir.write_json(PARTITION_STATS, exp.partition_stats)
    method = build_method(config)
    strategy = SubspaceStrategy(settings, exp, method, run_dir)
    if config.secagg:
        serve_secagg(grid, strategy)
        info(done_line(strategy.server.finish(exp), settings.out))
        return
    initial = flatten(exp.initial_state.factors, exp.initial_state.head, exp.initial_state.extras)
    strategy.start(
        grid=grid,
        initial_arrays=to_record(initial),
        num_rounds=config.num_rounds,
        timeout=settings.round_timeout,
        evaluate_fn=strategy.evaluate,
    )
    summary = strategy.server.finish(exp)
    info(done_line(summary, settings.out))
