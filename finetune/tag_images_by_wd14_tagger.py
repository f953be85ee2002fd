"""Tag images with a WD14 tagger: a `<image>.txt` of Danbooru-style tags beside each image (or one --output_path).

    python finetune/tag_images_by_wd14_tagger.py --batch_size 4 train_data

Models are ONNX, run through onnxruntime (on the GPU with onnxruntime-gpu): SmilingWolf's WD14 v2/v3
(`--repo_id SmilingWolf/wd-vit-tagger-v3`: model.onnx + selected_tags.csv) or the tag_mapping format
(`--repo_id namespace/name/subdir`: model_optimized.onnx + tag_mapping.json). They are downloaded into
`<model_dir>/<repo_id with / replaced by _>` when missing. sd-scripts' TensorFlow/Keras path is not
offered: `--onnx` is accepted and always on. An existing caption file is overwritten, as in sd-scripts,
unless `--append_tags` adds the new tags to it. Unreadable images are named and skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.args import ArgumentParser
from library.data import wd14_tagger
from library.tool_entry import run_tool


def build_parser() -> ArgumentParser:
    description, _, details = __doc__.split("\n\n", 2)
    parser = ArgumentParser(prog="tag_images_by_wd14_tagger.py", description=description, epilog=details)
    parser.add_argument("train_data_dir", help="folder of the images")

    model = parser.add_argument_group("model")
    model.add_argument("--repo_id", default=wd14_tagger.DEFAULT_REPO_ID,
                       help="hub repo of the tagger: namespace/name (WD14: model.onnx + selected_tags.csv) or "
                            "namespace/name/subdir (model_optimized.onnx + tag_mapping.json); "
                            f"default {wd14_tagger.DEFAULT_REPO_ID}")
    model.add_argument("--model_dir", default=wd14_tagger.DEFAULT_MODEL_DIR,
                       help="folder the models are kept in, as <model_dir>/<repo_id with / -> _> "
                            f"(default {wd14_tagger.DEFAULT_MODEL_DIR})")
    model.add_argument("--force_download", action="store_true", help="download the model files again")
    model.add_argument("--onnx", action="store_true",
                       help="accepted for compatibility: ONNX through onnxruntime is always used "
                            "(sd-scripts' TensorFlow/Keras path is not offered)")
    model.add_argument("--batch_size", type=int, default=1,
                       help="images per batch (default 1); a model with a fixed batch size uses its own")
    model.add_argument("--max_data_loader_n_workers", type=int, default=None,
                       help="threads that read and prepare images ahead of the model (default: none)")

    output = parser.add_argument_group("output")
    output.add_argument("--caption_extension", "--caption_extention", dest="caption_extension", default=".txt",
                        help="extension of the tag files (default .txt); an existing one is overwritten "
                             "unless --append_tags")
    output.add_argument("--output_path", default=None,
                        help="write one metadata file instead of tag files: .json ({image path: {tags, image_size}}) "
                             "or .jsonl (lines of {image_path, caption, image_size}); fine_tune.py reads both")
    output.add_argument("--append_tags", action="store_true",
                        help="add the new tags to the existing tag file (tags already there are not repeated)")
    output.add_argument("--caption_separator", default=", ", help="text between tags (default ', ')")
    output.add_argument("--recursive", action="store_true", help="also the images in sub-folders")
    output.add_argument("--frequency_tags", action="store_true", help="print how often each tag was written")
    output.add_argument("--debug", action="store_true", help="print each image's tags by category")

    choice = parser.add_argument_group("which tags")
    choice.add_argument("--thresh", type=float, default=0.35,
                        help="confidence a tag needs (default 0.35); the fallback of every --*_threshold")
    for category in ("general", "character", "copyright", "artist", "meta", "model"):
        newer = "" if category in ("general", "character") else " (tag_mapping models)"
        article = "an" if category[0] in "aeiou" else "a"
        choice.add_argument(f"--{category}_threshold", type=float, default=None,
                            help=f"confidence {article} {category} tag needs{newer}; default --thresh, above 1 = none")
    choice.add_argument("--undesired_tags", default="",
                        help="tags never written, separated by the caption separator without its spaces ('a,b')")
    choice.add_argument("--use_rating_tags", action="store_true",
                        help="write the most probable rating tag first")
    choice.add_argument("--use_rating_tags_as_last_tag", action="store_true",
                        help="write the most probable rating tag last")
    choice.add_argument("--use_quality_tags", action="store_true",
                        help="write the most probable quality tag first (tag_mapping models)")
    choice.add_argument("--use_quality_tags_as_last_tag", action="store_true",
                        help="write the most probable quality tag last (tag_mapping models)")

    naming = parser.add_argument_group("order and spelling")
    naming.add_argument("--character_tags_first", action="store_true", help="character tags before the others")
    naming.add_argument("--always_first_tags", default=None,
                        help="tags put first when an image has them, in this order, e.g. '1girl,1boy'")
    naming.add_argument("--character_tag_expand", action="store_true",
                        help="write a character tag name_(series) as two tags: name, series")
    naming.add_argument("--remove_underscore", action="store_true",
                        help="underscores to spaces in tags longer than 3 characters (^_^ stays)")
    naming.add_argument("--tag_replacement", default=None,
                        help=r"replace tags: 'source,target;source2,target2' (\, and \; for a comma or semicolon "
                             "inside a tag); applied after --character_tag_expand and --remove_underscore")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), wd14_tagger.tag_images, argv)


if __name__ == "__main__":
    sys.exit(main())
