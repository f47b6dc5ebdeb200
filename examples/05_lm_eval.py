"""Score a compressed folder with lm-evaluation-harness's own Python API.

lm-eval loads the folder as any Hugging Face model (``hf`` with ``trust_remote_code=True``, which runs the
folder's modeling file) and runs the two local tasks that ``python scripts/prepare_eval_tasks.py`` wrote:
``movie_sentiment`` (zero-shot sentiment of movie-review snippets) and ``prose_last_word`` (the last word
of a paragraph). Prints each task's metrics on its first ``--limit`` documents, with lm-eval's standard
error. ``lora-compress evaluate --tasks`` runs the same on the dense and the compressed model side by side.

    python examples/05_lm_eval.py [--folder FOLDER] [--tasks T,T] [--limit N]
"""
import argparse
import sys
from pathlib import Path

import torch
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--folder", default="out/examples/smollm2-80", help="a compressed causal LM folder")
parser.add_argument("--tasks", default="movie_sentiment,prose_last_word")
parser.add_argument("--include-path", default=".cache/eval_tasks", help="folder of the local task files")
parser.add_argument("--limit", type=int, default=20, help="documents per task")
args = parser.parse_args()
if not (Path(args.folder) / "lora_compress.json").exists():
    print(f"{args.folder} is not a compressed folder yet; write it with: python examples/02_compress_and_evaluate.py")
    sys.exit(2)
if not Path(args.include_path).is_dir():
    print(f"{args.include_path} is missing; prepare it with: python scripts/prepare_eval_tasks.py")
    sys.exit(2)

results = simple_evaluate(model="hf", model_args=f"pretrained={args.folder},trust_remote_code=True",
                          tasks=args.tasks.split(","), limit=args.limit, batch_size=8,
                          device="cuda" if torch.cuda.is_available() else "cpu",
                          task_manager=TaskManager(include_path=args.include_path))
for task, metrics in results["results"].items():
    scores = [f"{name.split(',')[0]} {value:.3f} ± {metrics.get(name.replace(',', '_stderr,', 1), 0):.3f}"
              for name, value in metrics.items() if isinstance(value, float) and "_stderr" not in name]
    print(f"{task} ({args.limit} documents): {', '.join(scores)}")
