"""``sahs export``: write a trained detector as a folder that loads without Lightning (safetensors + JSON).

    sahs export --ckpt_path outputs/demo/fit/<run>/checkpoints/best-....ckpt --output outputs/demo/detector

The folder holds ``detector.safetensors`` (weights) and ``detector.json`` (model fingerprint, heads in
feature order, scaler, threshold and its rule, detector class and arguments, checksums); ``sahs guard``
and ``sahs.guard.SafetyGuard`` read it. A folder that already holds a detector is replaced only with
``--overwrite``.
"""

from __future__ import annotations

from jsonargparse import ActionYesNo, ArgumentParser

from sahs.data.selection import describe_heads, model_name
from sahs.models.artifact import DetectorArtifact


def main(argv: list[str]) -> None:
    parser = ArgumentParser(prog="sahs export", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by `sahs fit`")
    parser.add_argument("--output", required=True, help="folder to write the detector into")
    parser.add_argument("--overwrite", action=ActionYesNo, default=False, help="replace a detector already in --output")
    options = parser.parse_args(argv)
    artifact = DetectorArtifact.read_checkpoint(options.ckpt_path)
    folder = artifact.save(options.output, overwrite=options.overwrite)
    print(f"[sahs] detector for {model_name(artifact.features.fingerprint)} on "
          f"{describe_heads(artifact.features.heads)}, threshold {artifact.threshold:.4f}: written to {folder}")
