"""contrastive-adapters: train one LLM adapter on contrastive pairs, flip its sign at inference.

    from adapters import load_run, steer
    model, tokenizer = load_run("runs/<name>")
    with steer(model, -1.0):      # +1 more honest, 0 exactly the base model, -1 less honest
        model.generate(...)

(The import name ``adapters`` is shared with AdapterHub's PyPI package ``adapters``; this
distribution is ``contrastive-adapters``. Do not install both in one environment.)
"""

from .pipeline import load_run
from .steer import steer

__all__ = ["load_run", "steer"]
__version__ = "0.1.0"
