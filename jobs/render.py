"""Ray Jobs entrypoint for batch rendering (same flags as `audiogen render`).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/render.py s3://bucket/manifests/ -o s3://bucket/renders --model s3://bucket/models/audiogen \
        --num-gpus 1 --min-actors 1 --max-actors 16 --max-batch-slots 64 --dtype bfloat16

Inside a job `RAY_ADDRESS` is set, so the pipeline attaches to the cluster instead of starting a local Ray.
"""

import sys

from audiogen.cli import main

if __name__ == "__main__":
    sys.exit(main(["render", *sys.argv[1:]]))
