"""Train a GLA or Transformer++ language model.

    python train.py --config=configs/tiny.py --workdir=runs/tiny [--config.steps=1000 ...]

Rerunning the same command resumes from the latest checkpoint in --workdir.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from gla_jax import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and samples go.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Build the model and state abstractly, print their size and exit."
)
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _DRY_RUN.value and not _WORKDIR.value:
        raise app.UsageError("--workdir is required (except with --dry_run)")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # checkpoint libraries log every file at INFO
    trainer.main(_CONFIG.value, _WORKDIR.value or "", dry_run=_DRY_RUN.value)


if __name__ == "__main__":
    app.run(main)
