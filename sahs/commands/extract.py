"""``sahs extract``: fill a run's activation cache as a Lightning predict run over the configured devices.

Uses the fit config's extraction callback (model, prompts, settings) and trainer devices, so
``--trainer.devices 8 --trainer.strategy ddp`` spreads prompts over GPUs (and ``num_nodes`` over nodes).
"""

from __future__ import annotations


def main(argv: list[str]) -> None:
    from sahs.commands.run_config import parse
    from sahs.extract.distributed import extract_with_trainer

    _, run = parse("extract", argv)
    if run.extraction is None:
        raise SystemExit("this config has no sahs.callbacks.ActivationExtraction in trainer.callbacks: "
                         "it names no model or prompt set to extract")
    callback = run.extraction
    status = extract_with_trainer(
        run.datamodule.cache_dir, callback.model, callback.prompts, callback.extraction,
        on_mismatch=callback.on_mismatch, progress=callback.progress, **run.devices)
    print(f"[sahs] activation cache {status}: {run.datamodule.cache_dir}")
