"""Prepares TFDS `imagenet2012` as array_record files, once, from the official tars.

Needs TensorFlow (the official TFDS builder reads the tars with tf.io.gfile):
`pip install '.[prepare]'`. Training then reads the prepared files without it.

    python scripts/prepare_imagenet.py --data_dir=/data/tfds [--manual_dir=/data/tars]

The tars (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar, from
https://image-net.org/download-images) go in --manual_dir, by default
<data_dir>/downloads/manual.
"""

import argparse
import sys

from bn_repro import imagenet_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).")
    parser.add_argument("--manual_dir", help="Directory of the two tars (default: <data_dir>/downloads/manual).")
    args = parser.parse_args()
    data_dir = args.data_dir or imagenet_data.default_data_dir()
    try:
        imagenet_data.prepare_imagenet(data_dir, args.manual_dir)
    except imagenet_data.ImagenetDataError as e:
        sys.exit(f"error: {e}")
    print(f"ImageNet is prepared (array_record) in {data_dir}.")


if __name__ == "__main__":
    main()
