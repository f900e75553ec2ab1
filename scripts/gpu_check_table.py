"""Print predicted vs measured peak memory for the trials of the given ftlab_sweep.json
files (written by the sweep callback): `python scripts/gpu_check_table.py gpu_check/*/ftlab_sweep.json`."""
import json
import sys

from mlflow.tracking import MlflowClient

MEASURED = "peak_memory_mb_cuda_max_allocated"


def main(paths: list[str]) -> int:
    print(f"{'model':<16}{'seq':>6}{'predicted GiB':>15}{'measured GiB':>14}{'error':>9}  state")
    worst = 0.0
    for path in paths:
        summary = json.load(open(path))
        for trial in summary["trials"]:
            params = MlflowClient().get_run(trial["run_id"]).data.params if trial.get("run_id") else {}
            metrics = trial["metrics"]
            predicted = metrics.get("predicted_peak_gb")
            measured = metrics.get(MEASURED, float("nan")) / 1024
            error = (predicted - measured) / measured if predicted and measured == measured else float("nan")
            if error == error:
                worst = max(worst, abs(error))
            print(f"{params.get('model.name', '?'):<16}{params.get('train.max_seq_length', '?'):>6}"
                  f"{predicted or float('nan'):>15.2f}{measured:>14.2f}{error:>+9.1%}  {trial['state']}")
    print(f"largest |error|: {worst:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
