"""EntityCLIP in JAX/Flax: entity-centric image-text matching.

Packages, each importing only those listed below it (tests/test_layers.py):
    cli, demo          the `entityclip` command and the end-to-end demo
    commands/          one module per group of CLI subcommands: flags in, a library call, a summary out
    train/             the training loop, step, optimizer, input stream, validation (may use eval/)
    eval/ | explain/   Recall@K, classification, search, reports | LLM explanations of the queries
    checkpoints/       a run's Orbax checkpoints and run files; opening whatever a checkpoint path holds
    config             ml_collections configs and every config check
    objective/ | parallel/   the loss (VTC, GI-ITM, hard negatives) | device mesh and sharding rules
    models/ | data/ | weights/   architecture and math | records, pipeline, tokenizer, sources,
                                 the explanation cache format | Hugging Face / OpenAI / release weight files
    hub, storage, errors        hub ids, local and gs:// paths, the one-line user error
"""

__version__ = "0.1.0"
