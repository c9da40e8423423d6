import ArgumentParser
import BlobStore
import CacheNode
import MeshShell
import CacheRoutes
import CacheMeshClient
import CMeshSystem
import Foundation
import Logging
import MeshHTTP
import MeshHTTP2
import MeshTLS
import Metrics
import NIOCore
import Prometheus
import ServiceLifecycle
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

@main
struct CacheMeshCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cachemesh",
        abstract: "A peer-to-peer, content-addressed build cache served over HTTP/2 + mutual TLS.",
        discussion: "Exit status: 0 ok; 1 a runtime failure (one line: Error: …); 2 a usage error (a flag, argument, config file or topology is wrong; nothing was done); node: 3 when its drain had to cut requests, 128+N after a second signal; get: 130/143 when interrupted. See docs/cli.md.",
        version: CacheMeshVersion.string,
        subcommands: [NodeCommand.self, PutCommand.self, GetCommand.self, StatusCommand.self, DemoCommand.self, SimulateGossipCommand.self, BenchFetchCommand.self, RelayCommand.self, BenchMeshDriverCommand.self])

    /// Exit codes: 0 ok, 1 runtime failure (`Error: …`, one line, no usage), 2 usage error
    /// (ArgumentParser's own 64 for parse/validation errors is mapped to 2), or a subcommand's
    /// own `ExitCode` (e.g. 130 after SIGINT).
    static func main() async {
        sizeEventLoopsToAffinity()
        let command: any ParsableCommand
        do {
            command = try await asyncParseAsRoot()
        } catch {
            exitAfterParsing(error)
        }
        do {
            if var async = command as? any AsyncParsableCommand {
                try await async.run()
            } else {
                var sync = command
                try sync.run()
            }
        } catch {
            exitAfterRunning(error, command: type(of: command))
        }
    }

    /// A node pinned to fewer CPUs than the machine has (`taskset`, a cpuset) runs one event loop
    /// per CPU it may use, not per CPU of the machine: more loops than CPUs only adds thread
    /// switches. NIO reads `NIO_SINGLETON_GROUP_LOOP_COUNT` when its shared group is first used
    /// (which is after this); a value the user set wins.
    static func sizeEventLoopsToAffinity() {
        guard getenv("NIO_SINGLETON_GROUP_LOOP_COUNT") == nil else { return }
        let allowed = Int(cm_affinity_cpu_count())
        if allowed > 0, allowed < System.coreCount {
            setenv("NIO_SINGLETON_GROUP_LOOP_COUNT", String(allowed), 0)
        }
    }

    /// Help and --version: stdout, 0. Parse and validation errors: message + usage on stderr, 2.
    static func exitAfterParsing(_ error: any Error) -> Never {
        guard exitCode(for: error) == .validationFailure else { exit(withError: error) }
        printError(fullMessage(for: error))
        Glibc.exit(ExitStatus.usage)
    }

    /// Errors thrown while a command runs: usage errors (a `ValidationError` or a wrong
    /// configuration found only now) → 2 with a pointer to the command's help; anything else → 1.
    static func exitAfterRunning(_ error: any Error, command: any ParsableCommand.Type) -> Never {
        let name = command == Self.self ? "cachemesh" : "cachemesh \(command.configuration.commandName ?? "")"
        if let e = error as? ExitCode { Glibc.exit(e.rawValue) }
        // Help requests (`cachemesh help node` runs ArgumentParser's help command, which throws),
        // CleanExit: as ArgumentParser does (stdout, 0).
        if exitCode(for: error) == .success { exit(withError: error) }
        switch error {
        case let e as ValidationError:
            printError("Error: \(oneLine(e.message))\n  See '\(name) --help' for more information.")
            Glibc.exit(ExitStatus.usage)
        case let e as ConfigurationError:
            printError("Error: \(oneLine(e.description))")
            Glibc.exit(ExitStatus.usage)
        case let e as LocalFileError:
            printError("Error: \(oneLine(e.description))")
            Glibc.exit(ExitStatus.usage)
        case _ where exitCode(for: error) == .validationFailure: // ArgumentParser's own parse errors
            printError(fullMessage(for: error))
            Glibc.exit(ExitStatus.usage)
        default:
            printError("Error: \(oneLine(describe(error)))")
            Glibc.exit(ExitStatus.failure)
        }
    }

    static func describe(_ error: any Error) -> String { String(describing: error) }

    static func oneLine(_ s: String) -> String {
        s.trimmingCharacters(in: .whitespacesAndNewlines).split(whereSeparator: \.isNewline).joined(separator: " ")
    }

    static func printError(_ s: String) {
        FileHandle.standardError.write(Data((s.hasSuffix("\n") ? s : s + "\n").utf8))
    }
}

/// The process exit statuses (README "Exit codes").
enum ExitStatus {
    static let success: Int32 = 0
    /// A runtime failure: a connection, a file, the server, a download that did not verify.
    static let failure: Int32 = 1
    /// The command line, a config file or a topology is wrong; nothing was done.
    static let usage: Int32 = 2
    /// `node`: the drain's grace period ended with requests in flight, which were cut.
    static let drainIncomplete: Int32 = 3
}

func bootstrapLogging(_ level: Logger.Level) {
    LoggingSystem.bootstrap { label in CacheMeshLogHandler(label: label, level: level) }
}

extension Logger.Level: @retroactive ExpressibleByArgument {}
extension ClientOptions.Transport: ExpressibleByArgument {}
extension QUICAddressValidationMode: ExpressibleByArgument {}

/// Transfer buffers of a few hundred KiB are allocated and freed all the time. glibc would serve
/// them with fresh mmaps (and trim the heap after frees), so every buffer paid page faults and
/// page clearing: ~25% of CPU time on a 64 MiB GET in a profile. Keep them on the heap.
func tuneAllocator() {
    cm_tune_malloc()
}
