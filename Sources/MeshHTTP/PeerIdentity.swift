/// What a peer may do, taken from its certificate (subject `OU=node|client|reader`).
public enum PeerRole: String, Sendable, CaseIterable, Comparable {
    /// Read only: GET/HEAD of CAS and AC.
    case reader
    /// Read and write the cache.
    case client
    /// A mesh node: everything, including mesh-internal routes.
    case node

    private var rank: Int {
        switch self {
        case .reader: 0
        case .client: 1
        case .node: 2
        }
    }

    public static func < (lhs: PeerRole, rhs: PeerRole) -> Bool { lhs.rank < rhs.rank }

    /// Whether this role may write (PUT) to the cache.
    public var canWrite: Bool { self >= .client }
}

/// Who is on the other end of a connection, as established by the TLS handshake.
public struct PeerIdentity: Sendable, Equatable, CustomStringConvertible {
    /// Subject common name of the verified peer certificate, if any.
    public var commonName: String?
    /// Role from the certificate; `nil` when the certificate carries no recognised role.
    public var role: PeerRole?
    /// True when the peer presented a certificate that chained to the mesh CA.
    public var authenticated: Bool

    public init(commonName: String?, role: PeerRole?, authenticated: Bool) {
        self.commonName = commonName
        self.role = role
        self.authenticated = authenticated
    }

    /// A connection without a certificate, admitted by `allowUnauthenticatedReads`.
    public static let anonymousReader = PeerIdentity(commonName: nil, role: .reader, authenticated: false)
    /// A plaintext connection (`--insecure`): trusted as a client, for local experiments only.
    public static let insecure = PeerIdentity(commonName: nil, role: .client, authenticated: false)

    public var description: String {
        "\(commonName ?? "-")(\(role?.rawValue ?? "no-role")\(authenticated ? "" : ", unauthenticated"))"
    }
}
