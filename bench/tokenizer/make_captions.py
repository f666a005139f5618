"""Writes N danbooru-style caption files (deterministic) into a folder.
Usage: python3 make_captions.py OUT_DIR [N]"""
import os
import random
import sys

WORDS = ("1girl 1boy solo long_hair short_hair smile looking_at_viewer blue_eyes red_eyes "
         "blonde_hair black_hair white_shirt skirt thighhighs hat bow ribbon jewelry "
         "outdoors indoors sky cloud tree flower cherry_blossoms night city street "
         "holding sword umbrella book cup phone upper_body full_body from_side "
         "open_mouth closed_eyes blush hand_on_hip sitting standing walking "
         "masterpiece best_quality highres absurdres detailed_background bokeh "
         "saber_(fate) hatsune_miku rem_(re:zero) k-on! :d ^_^ 8k photorealistic").split()


def main():
    out = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 10000
    rng = random.Random(7)
    for i in range(n):
        sub = os.path.join(out, "%d_set" % (i % 10 + 1))
        os.makedirs(sub, exist_ok=True)
        k = rng.choice([5, 10, 15, 20, 25, 30, 40])
        tags = [rng.choice(WORDS).replace("_", " " if i % 2 else "_") for _ in range(k)]
        with open(os.path.join(sub, "img%05d.txt" % i), "w", encoding="utf-8") as f:
            f.write(", ".join(tags) + "\n")


if __name__ == "__main__":
    main()
