// The one digest type (SHA-256 + size) is ContentDigest's; importers of BlobStore get it too.
@_exported import ContentDigest
