#!/usr/bin/python3
"""An independent S3 client (Debian's python3-boto3) for the S3-origin tests and benchmarks.

    s3.py ENDPOINT ACCESS SECRET mb BUCKET            create a bucket
    s3.py ENDPOINT ACCESS SECRET ls BUCKET [PREFIX]   print `key size` per object
    s3.py ENDPOINT ACCESS SECRET get BUCKET KEY       object bytes to stdout
    s3.py ENDPOINT ACCESS SECRET put BUCKET KEY FILE  upload a file as KEY
    s3.py ENDPOINT ACCESS SECRET rm BUCKET KEY        delete KEY
    s3.py ENDPOINT ACCESS SECRET bench-get BUCKET KEY N   N GETs of KEY, prints `bytes seconds`
    s3.py ENDPOINT ACCESS SECRET bench-get-each BUCKET KEY...  one GET of each KEY, prints `bytes seconds cpu_seconds`
                                                           (cpu_seconds: this process's user+system time during the GETs)
"""
import sys
import time

import boto3
from botocore.config import Config


def main():
    endpoint, access, secret, cmd, bucket = sys.argv[1:6]
    args = sys.argv[6:]
    s3 = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=access, aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, signature_version="s3v4", retries={"max_attempts": 1}))
    if cmd == "mb":
        s3.create_bucket(Bucket=bucket)
    elif cmd == "ls":
        prefix = args[0] if args else ""
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                print(o["Key"], o["Size"])
    elif cmd == "get":
        body = s3.get_object(Bucket=bucket, Key=args[0])["Body"]
        for chunk in iter(lambda: body.read(1 << 20), b""):
            sys.stdout.buffer.write(chunk)
    elif cmd == "put":
        with open(args[1], "rb") as f:
            s3.put_object(Bucket=bucket, Key=args[0], Body=f)
    elif cmd == "rm":
        s3.delete_object(Bucket=bucket, Key=args[0])
    elif cmd == "bench-get":
        key, n = args[0], int(args[1])
        total, start = 0, time.monotonic()
        for _ in range(n):
            body = s3.get_object(Bucket=bucket, Key=key)["Body"]
            for chunk in iter(lambda: body.read(1 << 20), b""):
                total += len(chunk)
        print(total, time.monotonic() - start)
    elif cmd == "bench-get-each":
        s3.head_bucket(Bucket=bucket)  # connect first: the timing is of the GETs
        total, start, cpu = 0, time.monotonic(), time.process_time()
        for key in args:
            body = s3.get_object(Bucket=bucket, Key=key)["Body"]
            for chunk in iter(lambda: body.read(1 << 20), b""):
                total += len(chunk)
        print(total, time.monotonic() - start, time.process_time() - cpu)
    else:
        sys.exit(f"s3.py: unknown command {cmd}")


if __name__ == "__main__":
    main()
