/// The version `cachemesh --version` prints. Bump it with every release (and tag `vX.Y.Z`).
enum CacheMeshVersion {
    static let string = "0.3.0"
}
