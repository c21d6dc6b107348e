"""`python -m abi_train recipe=llm|vit|clip [overrides]`: Hydra composition, then one training run.

User mistakes (UserError) end in one line on stderr and exit code 2; bugs keep their traceback.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from omegaconf import DictConfig

from abi_train.errors import UserError

T = TypeVar("T")
PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> Path:
    """Configs ship inside the wheel as abi_train/configs; an editable/source checkout uses ./configs."""
    for candidate in (PACKAGE_DIR / "configs", PACKAGE_DIR.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise RuntimeError(f"abi_train configs not found next to {PACKAGE_DIR}; the installation is broken")


def _show_keys(*keys: str, _root_: DictConfig) -> str:
    """``${abi_keys:a.b,c}`` in the --help page: ``a.b=VALUE c=VALUE`` as typed on the command line (null,
    true), the values of the composed config; keys this recipe's config lacks are left out."""
    from omegaconf import OmegaConf

    shown = []
    for key in keys:
        value = OmegaConf.select(_root_, key, default="\0missing")
        if value != "\0missing":
            shown.append(f"{key}={OmegaConf.to_yaml({'v': value}).removeprefix('v:').strip()}")
    return " ".join(shown)


def run_cli(fn: Callable[[], T]) -> T:
    """Run ``fn``; print a UserError as one line ``error: ...`` and exit 2."""
    try:
        return fn()
    except UserError as e:
        from abi_train.distributed import claim_error_report

        if claim_error_report():  # under torchrun: once per job, not once per rank
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def train(cfg: DictConfig, run_dir: Path, overrides: list[str] = ()) -> dict[str, float]:
    """One training run in ``run_dir`` (already created by Hydra); ``overrides`` as typed by the user."""
    from abi_train.distributed import dist_info_from_env, init_distributed
    from abi_train.tasks import task_class
    from abi_train.trainer import Trainer
    from abi_train.weights import model_overrides

    dist = dist_info_from_env()
    init_distributed(dist, str(cfg.trainer.device))
    task = task_class(cfg.task)(cfg, dist, model_overrides(overrides))
    return Trainer(cfg, task, run_dir, dist).fit()


def _remove_if_unused(run_dir: Path) -> None:
    """A run that failed on bad input leaves nothing behind but Hydra's own bookkeeping: remove that."""
    ours = {".hydra", "train.log"}
    if run_dir.is_dir() and not (run_dir / "checkpoints").exists() and {p.name for p in run_dir.iterdir()} <= ours:
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from abi_train.distributed import dist_info_from_env, launch_overrides

    if not OmegaConf.has_resolver("abi_keys"):
        OmegaConf.register_new_resolver("abi_keys", _show_keys)
    # Under torchrun every rank composes its own config: make them agree on one run dir first.
    sys.argv += run_cli(lambda: launch_overrides(sys.argv[1:]))

    @hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
    def _hydra_main(cfg: DictConfig) -> float | None:
        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
        try:
            summary = run_cli(lambda: train(cfg, run_dir, list(hydra_cfg.overrides.task)))
        except SystemExit:
            if dist_info_from_env().is_main:  # the run dir is shared by all ranks
                _remove_if_unused(run_dir)
            raise
        # Returned to Hydra so sweepers can optimise it.
        return summary.get("val/loss", summary.get("train/loss"))

    _hydra_main()


if __name__ == "__main__":
    main()
