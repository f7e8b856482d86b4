"""Ray Jobs entrypoint for training / fine-tuning the LM (same flags as `audiogen train`).

From scratch (LM size preset; T5, tokenizer and codec from --base, which must be the model whose codec encoded
the data):

    ray job submit --working-dir . --runtime-env jobs/train_runtime_env.yaml -- \
        python jobs/train.py s3://bucket/encoded/sounds-10s --storage s3://bucket/runs \
        --name sounds-small --preset small --base /mnt/models/audiogen-medium \
        --workers 16 --use-gpu --batch-size 8 --grad-accum 2 --max-steps 200000 --lr 5e-4 --warmup-steps 3000 \
        --eval-every 2000 --keep 3 --max-failures 5 --export s3://bucket/models/sounds-small

Fine-tune a published model (FSDP for the large ones):

    ray job submit --working-dir . --runtime-env jobs/train_runtime_env.yaml -- \
        python jobs/train.py s3://bucket/encoded/foley-10s --storage s3://bucket/runs --name foley-ft \
        --init /mnt/models/audiogen-medium --workers 8 --use-gpu --strategy fsdp --lr 1e-5 --schedule cosine \
        --max-steps 20000 --export s3://bucket/models/audiogen-medium-foley

Model directories (--base/--init) are read on every worker: a shared filesystem path, or s3:// (copied to a
local cache on each node). Resubmitting a job with the same --storage and --name resumes from its latest
checkpoint; worker failures within a run restart from it automatically (--max-failures).
"""

import sys

from audiogen.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
