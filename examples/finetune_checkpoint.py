"""Fine-tune an existing neuraloperator checkpoint with exact boundary conditions in the loop.

1. A plain FNO trained on the heat problem of the quickstart is saved with neuraloperator's own
   `save_checkpoint` (trained here on first use, if no checkpoint is given).
2. It is loaded with `FNO.from_checkpoint`, wrapped with the two Neumann conditions, and
   fine-tuned with the constraint in the loop.
3. The fine-tuned wrapper is saved (its state dict is the model's under `model.`, pure tensors:
   `torch.load(weights_only=True)` reads it), reloaded into a fresh wrapper, and saved back as a
   plain neuraloperator checkpoint.

    .venv/bin/python examples/finetune_checkpoint.py [--checkpoint DIR] [--epochs 20]

Prints the boundary error and the relative L2 error before and after fine-tuning.
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

import torch
from quickstart import T_END, U, make_data, train

import constraint_layers as cl


def evaluate(model, x, y, bcs) -> tuple[float, float, float]:
    with torch.no_grad():
        pred = model(x)
    err = cl.metrics.boundary_error(pred, bcs)
    return float(cl.metrics.relative_l2(pred, y)), float(err[0]), float(err[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("out/fno_heat"))
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--pretrain-epochs", type=int, default=40)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", module="neuralop")
    from neuralop.models import FNO

    torch.manual_seed(0)
    train_set, (x_test, y_test) = make_data(400, 100, 128, seed=0)
    if not (args.checkpoint / "fno_metadata.pkl").exists():
        print(f"no checkpoint in {args.checkpoint}: training a plain FNO first")
        fno = FNO(n_modes=(16,), in_channels=2, out_channels=1, hidden_channels=32)
        train(fno, train_set, args.pretrain_epochs)  # (epochs, seconds)
        fno.save_checkpoint(args.checkpoint, "fno")

    fno = FNO.from_checkpoint(args.checkpoint, "fno")  # the user's existing model
    bcs = [cl.Neumann(0.0, side="low"), cl.Neumann(U * math.sin(math.pi * T_END), side="high")]
    rows = [("checkpoint (plain FNO)", *evaluate(fno, x_test, y_test, bcs))]
    model = cl.wrap(fno, *bcs)
    rows.append(("checkpoint + cl.wrap", *evaluate(model, x_test, y_test, bcs)))

    train(model, train_set, args.epochs, seed=1)  # fine-tune with the constraint in the loop
    rows.append(("fine-tuned, wrapped", *evaluate(model, x_test, y_test, bcs)))

    # save and reload: the wrapper's checkpoint is pure tensors under the single prefix `model.`
    path = args.checkpoint / "finetuned_wrapped.pt"
    torch.save(model.state_dict(), path)
    fresh = cl.wrap(FNO(n_modes=(16,), in_channels=2, out_channels=1, hidden_channels=32), *bcs)
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    rows.append(("reloaded wrapper", *evaluate(fresh, x_test, y_test, bcs)))
    # and back to a plain neuraloperator checkpoint (unwrap returns the very same FNO)
    cl.unwrap(fresh).save_checkpoint(args.checkpoint, "fno_finetuned")
    again = cl.wrap(FNO.from_checkpoint(args.checkpoint, "fno_finetuned"), *bcs)
    rows.append(("plain checkpoint, re-wrapped", *evaluate(again, x_test, y_test, bcs)))

    print(f"\n{'model':30s} {'relative L2':>12s} {'flux err x=0':>13s} {'flux err x=1':>13s}")
    for name, l2, e0, e1 in rows:
        print(f"{name:30s} {l2:12.4f} {e0:13.2e} {e1:13.2e}")
    print(f"\nsaved: {path} and {args.checkpoint / 'fno_finetuned_state_dict.pt'}")


if __name__ == "__main__":
    main()
