"""`python -m ftlab.data [overrides]`: only the data stage, with the same conf/ and schema as
`python -m ftlab`. Writes train.jsonl, held_out.jsonl, report.json, rejects.jsonl and PNGs to a
directory it prints, so the cleaned data can be inspected before any compute is spent."""
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ftlab import config, files, models
from ftlab.config import ConfigError, exit_2_on  # and registers the structured-config schema
from ftlab.data import DataError, prepare
from ftlab.data.report import print_table, write_outputs


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    with exit_2_on(DataError, ConfigError):  # ConfigError: a base model (tokenizer) not found, too
        config.check(cfg)  # the values python -m ftlab refuses (data.eval_size=2.5), refused here too
        out_dir = files.make_dir(cfg.data.export_dir, "data.export_dir") if cfg.data.export_dir else None
        if cfg.data.rejects:
            files.make_file_dir(cfg.data.rejects, "data.rejects")
        cache = models.cache_root(cfg.cache_dir)
        tokenizer = models.load_tokenizer(models.resolve_checkpoint(cfg.model, cfg.cache_dir),
                                          cfg.model.trust_remote_code)
        data = prepare(cfg.data, tokenizer, cfg.train.max_seq_length, cache)
        out = write_outputs(data, cfg.train, out_dir or Path(f"outputs/data/{data.fingerprint}"))
        print_table(data, cfg.train)
        print(f"cleaned data written to {out.resolve()}")


if __name__ == "__main__":
    main()
