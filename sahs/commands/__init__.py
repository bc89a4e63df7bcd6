"""``sahs`` verbs beyond fit/validate/test/predict.

Each verb is a thin module ``sahs.commands.<verb>`` with ``main(argv)``. A verb that reads a run
config may also define ``Options``, a dataclass of its own settings: they form the section ``<verb>:``
of every run config (``loao: {top_k: 8}``) and are set on the command line as ``--loao.top_k 8``.
This package imports nothing heavy: ``sahs --help`` reads these tables without torch or Lightning.
"""

# The Trainer's verbs, run by ``sahs.cli`` (LightningCLI), with their one-line descriptions.
LIGHTNING_VERBS: dict[str, str] = {
    "fit": "extract (or reuse) the cache, train the detector, then validate and test the best checkpoint",
    "validate": "validate a trained detector (--ckpt_path) on the validation split",
    "test": "test a trained detector (--ckpt_path) on the test split",
    "predict": "score every prompt (or one split) with a trained detector (--ckpt_path); write predictions.csv",
}

# verb -> one-line description, shown by `sahs --help` (the Lightning verbs come first).
VERBS: dict[str, str] = {
    "extract": "fill a run's activation cache over the configured devices (a Lightning predict run)",
    "locate": "rank every (layer, head) by a probe on that head alone; write the ranking and heatmap",
    "loao": "leave-one-attack-out generalization of the configured detector, fold by fold",
    "ablate": "answers with the top-k located heads ablated, against no ablation and random heads",
    "patch": "rank every (layer, head) causally by activation patching over malicious/benign pairs, beside the probe ranking",
    "sweep": "run a W&B sweep definition in this process, online or offline; `sahs sweep report DIR` rebuilds its summary",
    "data": "build a prompt set and save it with its dataset card (`sahs data build --config ...`)",
    "export": "write a trained detector (--ckpt_path) as safetensors + JSON that load without Lightning",
    "guard": "answer JSONL prompts through a model, refusing those an exported detector flags at the first token",
    "cache": "check an activation cache (`verify DIR`) or re-extract only its bad rows (`repair DIR --config C`)",
}
