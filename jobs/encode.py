"""Ray Jobs entrypoint for encoding (audio, caption) manifests into codec tokens (same flags as `audiogen encode`).

    ray job submit --working-dir . --runtime-env jobs/train_runtime_env.yaml -- \
        python jobs/encode.py s3://bucket/manifests/sounds.parquet s3://bucket/encoded/sounds-10s \
        --codec s3://bucket/models/audiogen-medium --segment-seconds 10 --pad-last \
        --encoders 8 --encoder-gpus 1 --read-cpus 1 --encode-batch 32

Reading/resampling runs as CPU tasks across the cluster, encoding in `--encoders` codec actors. Rerunning the same
command after a failure (or after adding rows to the manifest) encodes only what is missing. Inside a job
`RAY_ADDRESS` is set, so the pipeline attaches to the cluster instead of starting a local Ray.
"""

import sys

from audiogen.cli import main

if __name__ == "__main__":
    sys.exit(main(["encode", *sys.argv[1:]]))
