import BlobStore

/// The store's digest under a name that does not clash with MeshCore's compact `Digest`
/// (this file imports only BlobStore, so `Digest` is unambiguous here).
public typealias StoreDigest = Digest
