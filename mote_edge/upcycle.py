"""Up-cycle a dense LLaVA (SigLIP + MLP + Qwen2) checkpoint into MoTE or MoE-LLaVA.

    mote-upcycle BASE_DIR -o OUT_DIR --experts 4 --top-k 1 [--layers all|sparse|0,2,5]
                 [--init ffn|random] [--variant mote|moe-llava]
"""
from __future__ import annotations

from pathlib import Path

from .checkpoint import atomic_dir, check_llava_qwen2, check_weights, load_model, read_config, save_model
from .config import INITS, VARIANTS, MoTEConfig, parse_layers
from .errors import MoteError, cli_entry
from .model import apply_mote_
from .exporters.errors import ArgumentParser


def upcycle(base_dir: str | Path, out_dir: str | Path, experts: int = 4, top_k: int | None = None,
            layers: str = "all", init: str = "ffn", variant: str = "mote", balance_coef: float = 0.01,
            seed: int = 0, overwrite: bool = False) -> MoTEConfig:
    base = Path(base_dir)
    cfg_json = read_config(base)
    check_llava_qwen2(cfg_json, str(base))
    if cfg_json.get("mote"):
        raise MoteError(f"{base} is already a MoE checkpoint (config.json has 'mote'); give a dense checkpoint")
    check_weights(base)
    num_layers = cfg_json["text_config"]["num_hidden_layers"]
    if top_k is None:  # paper settings: MoTE top-1, MoE-LLaVA top-2
        top_k = 1 if variant == "mote" else min(2, max(experts, 1))
    cfg = MoTEConfig(num_experts=experts, top_k=top_k,
                     layers=parse_layers(layers, num_layers), variant=variant, init=init,
                     balance_coef=balance_coef).validate(num_layers)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:  # validated before anything is written
        model = load_model(base)
        apply_mote_(model, cfg, init=init, seed=seed)
        save_model(model, tmp, side_files_from=base)
    return cfg


@cli_entry
def main(argv=None):
    p = ArgumentParser(prog="mote-upcycle", description=__doc__.split("\n")[1])
    p.add_argument("base_dir", help="dense LLaVA checkpoint folder (config.json + model.safetensors)")
    p.add_argument("-o", "--output", required=True, help="output checkpoint folder")
    p.add_argument("--experts", type=int, default=4, help="routed experts per MoE layer (default 4)")
    p.add_argument("--top-k", type=int, default=None, help="experts per token (default: 1 mote, 2 moe-llava)")
    p.add_argument("--layers", default="all", help="all | sparse (every other) | comma-separated indices")
    p.add_argument("--init", choices=INITS, default="ffn", help="routed expert init (default ffn)")
    p.add_argument("--variant", choices=VARIANTS, default="mote")
    p.add_argument("--balance-coef", type=float, default=0.01, help="load-balance loss coefficient")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    a = p.parse_args(argv)
    cfg = upcycle(a.base_dir, a.output, a.experts, a.top_k, a.layers, a.init, a.variant, a.balance_coef,
                  a.seed, a.overwrite)
    print(f"wrote {a.output}: variant={cfg.variant} experts={cfg.num_experts} top_k={cfg.top_k} "
          f"layers={cfg.layers} init={cfg.init}")
