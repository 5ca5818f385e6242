"""The agent's key and certificate chores, run in a short-lived child process.

``python -m fedge.agent.keytool COMMAND ...`` does the few things that need
the ``cryptography`` package: make the device key, write a CSR, read a
certificate, fetch a CA by its pin. The long-running agent calls it at
enrolment and renewal only, so it never loads ``cryptography`` itself (about
9 MB of memory on a small device; see docs/benchmarks.md).

Output is on stdout (a PEM, or one line of JSON); a refusal is one line on
stderr with exit status 3 (``reason: detail``), an unreachable coordinator
exit status 4. No key material is ever printed: the key stays in its file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedge import pki
from fedge.errors import TransportError

EXIT_REFUSED, EXIT_UNREACHABLE = 3, 4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedge.agent.keytool")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("csr", help="make the key (mode 0600) unless it exists; print a CSR for it")
    p.add_argument("--key", type=Path, required=True)
    p.add_argument("--device-id", required=True)
    p = sub.add_parser("inspect", help="print a certificate's device id and validity as JSON")
    p.add_argument("--cert", type=Path, required=True)
    p = sub.add_parser("fetch-ca", help="fetch the coordinator's CA and print it if it matches the pin")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pin", required=True)
    p.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    try:
        if args.command == "csr":
            if not args.key.exists():
                pki.write_private_key(args.key, pki.new_device_key())
            from cryptography.hazmat.primitives import serialization

            key = serialization.load_pem_private_key(args.key.read_bytes(), password=None)
            sys.stdout.write(pki.make_csr(key, args.device_id).decode())
        elif args.command == "inspect":
            cert = pki.load_cert_pem(args.cert.read_bytes())
            print(
                json.dumps(
                    {
                        "device_id": pki.device_id_of(cert),
                        "not_before": cert.not_valid_before_utc.timestamp(),
                        "not_after": cert.not_valid_after_utc.timestamp(),
                    }
                )
            )
        else:
            sys.stdout.write(
                pki.fetch_pinned_ca(
                    args.host, args.port, pin_sha256=args.pin, timeout_s=args.timeout
                ).decode()
            )
    except pki.PKIError as e:
        print(str(e), file=sys.stderr)
        return EXIT_REFUSED
    except (OSError, ValueError) as e:
        print(f"bad_file: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except TransportError as e:
        print(str(e), file=sys.stderr)
        return EXIT_UNREACHABLE
    return 0


if __name__ == "__main__":
    sys.exit(main())
