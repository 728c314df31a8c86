"""Which calibration map suits an image checkpoint: each one fitted on half of its validation split and
scored on the other half (both ways, over ``--repeats`` random halvings), on the checkpoint's own
validation logits in the precision the service runs.

    python benchmarks/image/calibration_study.py checkpoints/cifar10-ensemble --data DATA/train

Maps compared: a temperature; a temperature then a Platt map of the top probability's log-odds (two
parameters); then isotonic regression of the top probability; then the beta map the project ships
(``models.calibration.TopLabelMap``, three parameters). Also reported: the ECE a perfectly calibrated
model with the same confidences would show on this many images (its sampling noise floor).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.calibration import Calibration, TopLabelMap, top_label_parts  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402
from models.preprocessing import ImagePreprocessing  # noqa: E402
from training.engine.calibration import (  # noqa: E402
    Fitter,
    calibration_fitter,
    expected_calibration_error,
    fit_calibration,
    fit_temperature,
    out_of_fold_ece,
)
from training.engine.loop import predict_logits  # noqa: E402
from training.image.data import load_image_folder, stratified_split  # noqa: E402
from training.image.task import evaluation_batches  # noqa: E402


def platt_map(logits: torch.Tensor, labels: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The beta map with its two weights tied: logit c' = a · logit c + m."""
    temperature = fit_temperature(logits, labels)
    log_odds = top_label_parts(logits.double() / temperature).log_odds.squeeze(-1)
    correct = (logits.argmax(dim=1) == labels).double()
    parameters = torch.tensor([1.0, 0.0], dtype=torch.double, requires_grad=True)
    optimizer = torch.optim.LBFGS([parameters], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(parameters[0] * log_odds + parameters[1], correct)
        loss.backward()
        return loss

    optimizer.step(closure)
    slope, intercept = (float(value) for value in parameters.detach())
    return Calibration(temperature, TopLabelMap(max(slope, 0.05), max(slope, 0.05), intercept)).probabilities


def isotonic_map(logits: torch.Tensor, labels: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    from sklearn.isotonic import IsotonicRegression

    temperature = fit_temperature(logits, labels)
    confidence, predicted = (logits.double() / temperature).softmax(dim=1).max(dim=1)
    regression = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(
        confidence.numpy(), (predicted == labels).double().numpy())

    def apply(new_logits: torch.Tensor) -> torch.Tensor:
        probabilities = (new_logits.double() / temperature).softmax(dim=1)
        top, top_class = probabilities.max(dim=1)
        mapped = torch.tensor(regression.predict(top.numpy()), dtype=torch.double).clamp(1e-6, 1 - 1e-6)
        others = probabilities.scatter(1, top_class[:, None], 0.0)
        others = others / others.sum(dim=1, keepdim=True).clamp_min(1e-12) * (1 - mapped)[:, None]
        return others.scatter(1, top_class[:, None], mapped[:, None]).float()

    return apply


MAPS: dict[str, Fitter] = {"temperature": calibration_fitter(False), "temperature + Platt": platt_map,
                           "temperature + isotonic": isotonic_map, "temperature + beta (shipped)": calibration_fitter(True)}


def noise_floor(logits: torch.Tensor, labels: torch.Tensor, draws: int = 200) -> float:
    """Median ECE of outcomes drawn as the calibrated confidences say: what a perfect model would show."""
    probabilities = fit_calibration(logits, labels, top_label=True).probabilities(logits)
    generator = torch.Generator().manual_seed(0)
    predicted = probabilities.argmax(dim=1)
    floors = []
    for _ in range(draws):
        right = torch.rand(len(labels), generator=generator) < probabilities.max(dim=1).values
        floors.append(expected_calibration_error(probabilities, torch.where(right, predicted, -1)))
    return float(torch.tensor(floors).median())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="the data the checkpoint was trained on")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    loaded = load_checkpoint(args.checkpoint)
    split = loaded.manifest.metrics["validation"].get("split", {"fraction": 0.1, "seed": 0})
    data = load_image_folder(args.data)
    _, held_out = stratified_split(data.labels, split["fraction"], split["seed"])
    validation = data.subset(held_out)
    preprocessing = ImagePreprocessing.from_manifest(loaded.manifest)
    logits, labels = predict_logits(loaded.model, evaluation_batches(validation, preprocessing, 500), torch.device("cpu"))
    result = {"checkpoint": str(args.checkpoint), "images": len(labels),
              "accuracy": float((logits.argmax(1) == labels).float().mean()),
              "ece_out_of_fold": {name: out_of_fold_ece(logits, labels, fitter, args.repeats)
                                  for name, fitter in MAPS.items()},
              "ece_noise_floor": noise_floor(logits, labels)}
    print(json.dumps(result, indent=2))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
