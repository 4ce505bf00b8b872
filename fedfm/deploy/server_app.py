"""The Flower ServerApp of a fedfm deployment: serves the submitted run (:func:`fedfm.deploy.serve.serve`).

``fedfm deploy submit`` puts the resolved YAML config in Flower's run config
(key ``fedfm-config``) and ``fedfm-resume = true`` to continue a run folder
from its latest checkpoint. Flower starts this app in its own process on the
SuperLink's machine for the run's lifetime; the run folder is written there.
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedfm.errors import FedfmError

CONFIG_KEY, RESUME_KEY = "fedfm-config", "fedfm-resume"

app = ServerApp()
log = logging.getLogger("fedfm")


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedfm.config.load import config_from_text
    from fedfm.deploy.serve import serve

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)  # fedfm's own lines (nodes joining, drops, rejections); Flower's stay quiet
    text = context.run_config.get(CONFIG_KEY)
    try:
        if not isinstance(text, str):
            raise FedfmError(f"the run config has no '{CONFIG_KEY}': submit it with `fedfm deploy submit`")
        serve(grid, config_from_text(text), resume=bool(context.run_config.get(RESUME_KEY, False)))
    except FedfmError as err:
        log.error("fedfm: error: %s", err)
        raise RuntimeError(f"fedfm: {err}") from None
