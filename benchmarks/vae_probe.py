"""Probe for issue #14's MovieLens bar (hybrid >= EASE + 2 %): Mult-VAE (Liang et al., WWW 2018: multinomial
likelihood, input dropout 0.5, KL annealed to beta 0.2, 600-200-600 tanh) on ml-latest-small, random-75-25 (the
harness's `random_split`), k 10; alone, and blended with EASE (per-user z-scored scores, EASE + w · VAE, w from
0.1 / 0.25 / 0.5). Every 25th epoch and the weight are picked on TEST: an upper bound. Recorded in
docs/benchmarks.md ("Levers tried"): alone 0.31 against EASE 0.39, blended +0.2 % at best, dropped.

    python benchmarks/vae_probe.py --seeds 1
Writes benchmarks/results/vae_probe_movielens.json. Needs ../shared/data/movielens-latest-small.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from movielens_probe import L2, ease_from_inverse, ndcg10, ratings, ridge_inverse, split_matrix


class MultVAE(torch.nn.Module):
    def __init__(self, n_items: int, hidden: int = 600, latent: int = 200):
        super().__init__()
        self.enc, self.mu, self.logvar = (torch.nn.Linear(n_items, hidden), torch.nn.Linear(hidden, latent),
                                          torch.nn.Linear(hidden, latent))
        self.dec1, self.dec2 = torch.nn.Linear(latent, hidden), torch.nn.Linear(hidden, n_items)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x: torch.Tensor):
        h = torch.tanh(self.enc(self.drop(torch.nn.functional.normalize(x, dim=1))))
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return self.dec2(torch.tanh(self.dec1(z))), mu, logvar


def zscore(a: np.ndarray) -> np.ndarray:
    return (a - a.mean(1, keepdims=True)) / (a.std(1, keepdims=True) + 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--epochs", type=int, default=300)
    a = ap.parse_args()
    torch.set_num_threads(2)
    df = ratings()
    res = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        torch.manual_seed(seed)
        x, users, truth = split_matrix(df, seed)
        b = ease_from_inverse(ridge_inverse(x, L2[seed]))
        ease = x[users] @ b
        ease_ndcg = ndcg10(ease, x[users], truth)
        model = MultVAE(x.shape[1])
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        xt, step = torch.from_numpy(x), 0
        for epoch in range(1, a.epochs + 1):
            model.train()
            perm = torch.randperm(len(xt))
            for s in range(0, len(xt), 64):
                xb = xt[perm[s: s + 64]]
                logits, mu, logvar = model(xb)
                nll = -(torch.log_softmax(logits, 1) * xb).sum(1).mean()
                kl = (-0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(1)).mean()
                loss = nll + min(0.2, step / 2000) * kl
                step += 1
                opt.zero_grad()
                loss.backward()
                opt.step()
            if epoch % 25 == 0:
                model.eval()
                with torch.no_grad():
                    vae = torch.log_softmax(model(xt[users])[0], 1).numpy()
                blend = {w: ndcg10(zscore(ease) + w * zscore(vae), x[users], truth) for w in (0.1, 0.25, 0.5)}
                run = {"seed": seed, "epoch": epoch, "vae": ndcg10(vae, x[users], truth), "ease": ease_ndcg,
                       "blend": blend}
                res.append(run)
                w = max(blend, key=blend.get)
                print(f"seed {seed} epoch {epoch} vae {run['vae']:.4f} ease {ease_ndcg:.4f} blend w {w} "
                      f"{blend[w]:.4f} ({blend[w] / ease_ndcg - 1:+.2%})", flush=True)
    out = Path(__file__).resolve().parent / "results" / "vae_probe_movielens.json"
    out.write_text(json.dumps(res, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
