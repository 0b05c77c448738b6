"""Datasets: the plugin protocol, discovery, class-incremental streams, downloads, transforms, loaders."""

from ntkcl.data.manifest import Manifest, read_manifest, write_manifest
from ntkcl.data.plugin import DatasetPlugin, RemoteFile, Samples

__all__ = ["DatasetPlugin", "Manifest", "RemoteFile", "Samples", "read_manifest", "write_manifest"]
