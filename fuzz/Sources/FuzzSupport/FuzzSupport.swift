// Entry point shared by the fuzz targets.
//
// `-sanitize=fuzzer` links libFuzzer, whose own `main` calls `LLVMFuzzerTestOneInput`. SwiftPM,
// however, links every executable with `--defsym main=<module>_main` (so executables can be
// imported by tests), which fails when the module has no entry point. So each target has a tiny
// `@main` that hands argc/argv and its callback to libFuzzer's `LLVMFuzzerRunDriver` (the
// documented way to drive libFuzzer from a program with a main of its own); each target still
// defines `LLVMFuzzerTestOneInput`, for tools that expect it.

public typealias FuzzCallback = @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt

@_silgen_name("LLVMFuzzerRunDriver")
private func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<CInt>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
    _ callback: FuzzCallback
) -> CInt

public func runLibFuzzer(_ callback: FuzzCallback) -> Never {
    var argc = CommandLine.argc
    var argv = CommandLine.unsafeArgv
    let rc = LLVMFuzzerRunDriver(&argc, &argv, callback)
    exit(rc)
}

@_silgen_name("exit")
private func exit(_ code: CInt) -> Never
