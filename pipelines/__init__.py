"""Recipes as plain functions, and the `v05` command line that parses options and calls them.

    config.py        YAML loader: dataclass defaults < YAML < command line, nested sections, legacy keys
    data.py          store recipes: import_source, export_verl, ingest_rollouts, store_summary, run_sql
    build_data.py    stage 1: GRPO over a policy family, every rollout into the store (BuildDataConfig)
    pretrain_v0.py   V0 pre-training on the store (or a release folder) and predict_v0
    rl_train.py      stage 2: one RL run on the embedded engine, or a launch on verl
    evaluate.py      mean@k of a policy on a task source
    experiment.py    named grids of rl-train runs over seeds
    report.py        markdown + figures from the runs' metrics.jsonl
    demo.py          the whole pipeline on the embedded default, stage by stage, resumable
    bench/           estimator (Monte Carlo of the baselines), store (ingest, disk, prompt_stats)
    cli/             the click commands (option parsing only) and the lazy command table
    configs/         tiny.yaml (embedded default), paper/grpo/dapo.yaml (verl), experiments/*.yaml

Data flows one way: pipelines imports v05_rl, v0_model and v0_data, never the reverse.
"""
