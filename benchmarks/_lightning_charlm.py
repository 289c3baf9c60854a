"""``jobs/train_charlm.yaml`` written as a PyTorch Lightning job (the comparison of
``bench_lightning.py``; run as its own process, timed from outside).

    python benchmarks/_lightning_charlm.py --steps 200 --devices 1
    python benchmarks/_lightning_charlm.py --steps 200 --devices 2    # DDP on CPU (gloo)

The same model (jobs/charlm.py's CharTransformer), data (its windows), recipe (AdamW 3e-3 with
weight decay 0.01, 40 warmup steps then cosine, 2 micro-batches of 32 per step, clipping at 1.0),
validation every 50 steps on the same 512 windows, seed 0. Prints one JSON line: the final
validation loss and the steady samples/s (from the 21st step on).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "jobs"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="lightning_runs")
    args = parser.parse_args()

    import charlm
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(args.threads)
    pl.seed_everything(0, workers=True)
    accumulate, warmup, every = 2, 40, 50

    class CharLM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = charlm.CharTransformer.__raytorch_module__(d_model=96, layers=2)
            self.started: tuple[float, int] | None = None
            self.samples = 0

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = charlm.next_char_loss(self.model(x), y)
            self.log("train_loss", loss)
            self.samples += len(x)
            if self.global_step == 20 and self.started is None:
                self.started = (time.perf_counter(), self.samples)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            loss = charlm.next_char_loss(self.model(x), y)
            self.log("valid_loss", loss, sync_dist=True)

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.01)
            cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps - warmup)
            linear = torch.optim.lr_scheduler.LinearLR(optimizer, 1 / warmup, 1.0, warmup)
            schedule = torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], [warmup])
            return [optimizer], [{"scheduler": schedule, "interval": "step"}]

    def loader(split: str, rows: int | None, shuffle: bool) -> DataLoader:
        cols = charlm.windows(split, rows=rows)
        data = TensorDataset(torch.as_tensor(cols["x"]), torch.as_tensor(cols["y"]))
        return DataLoader(data, batch_size=32, shuffle=shuffle)

    module = CharLM()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_steps=args.steps,
        val_check_interval=every * accumulate,  # counted in micro-batches
        check_val_every_n_epoch=None,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=1.0,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.out,
        deterministic=False,
    )
    trainer.fit(module, loader("train", None, True), loader("valid", 512, False))
    if trainer.global_rank == 0:
        end = time.perf_counter()
        assert module.started is not None
        steady = (module.samples - module.started[1]) * args.devices / (end - module.started[0])
        loss = float(trainer.callback_metrics.get("valid_loss", math.nan))
        print(json.dumps({"valid_loss": loss, "steady_samples_per_s": steady}), flush=True)


if __name__ == "__main__":
    main()
