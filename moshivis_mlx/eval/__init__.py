"""moshivis-eval: the MoshiVis paper's spoken visual benchmarks on Kyutai's Babillage.

    data.py     Babillage's parquet files, the references, the image folders
    answer.py   the one seam that drives the model: a question in, the answer text out
    run.py      the plan (limit, images, shards), resuming, progress, the run
    metrics.py  CIDEr-D, VQA accuracy, exact match, their intervals
    ptb.py      COCO's caption tokenization in Python
    report.py   predictions, metrics.json, results.md, merging shards
"""
