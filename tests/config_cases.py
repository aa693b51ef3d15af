"""Run ``EngineArgs.create_engine_config`` for each case of a JSON file and print what came of it, as JSON.

``python -m tests.config_cases CASES.json`` (the plugin on, or off with ``VLLM_PLUGINS=none``): one line,
``{name: {"config": summary} | {"error": [type, message]}}``. No engine starts, no weights load. A process of its
own, so that the environment (``HF_HOME``, ``HF_HUB_OFFLINE``, the working directory) is read as a user's would be.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def summary(config: Any) -> dict[str, Any]:
    """What an engine is built from: vLLM's own summary and hash, and the plugin's section."""
    spec = config.speculative_config
    draft = spec.draft_model_config if spec is not None else None
    return {
        "str": str(config),
        "hash": config.compute_hash(),
        "additional_config": config.additional_config,
        "target_type": config.model_config.hf_text_config.model_type,
        "draft": None if draft is None else [draft.model, draft.hf_config.model_type, spec.method],
    }


def main(path: str) -> None:
    from vllm.engine.arg_utils import EngineArgs

    results = {}
    for name, args in json.loads(open(path).read()).items():
        try:
            engine_args = EngineArgs(**args)
            results[name] = {"config": summary(engine_args.create_engine_config())}
        except Exception as e:  # the exception itself is the result
            results[name] = {"error": [type(e).__name__, *str(e).splitlines()[:2]]}
    print("RESULTS " + json.dumps(results, default=str), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
