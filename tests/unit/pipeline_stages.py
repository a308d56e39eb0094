"""Stage factories for the pipeline tests (module level: spawned workers import them by name)."""

import os
import time


def numbers_reader(args):
    def read(task):
        start, count = task
        for i in range(start, start + count):
            yield (i, b"x" * args["payload_bytes"])

    return read


def summing_writer(args):
    def write(item):
        if item[0] == args.get("fail_at"):
            raise ValueError(f"cannot write item {item[0]}")
        if item[0] == args.get("die_at"):
            os._exit(9)
        if args.get("sleep"):
            time.sleep(args["sleep"])
        return item[0]

    return write
