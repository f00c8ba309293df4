package ai.edgedeploy.harness;

/**
 * JNI bridge to the native runner (android_template/runner/src/jni_bridge.cc).
 *
 * <p>Plain Java (no Android API), so the host JVM test loads the same class against a host build of
 * libedgedeploy_jni.so. {@link #run} takes the CLI's arguments and returns its JSON result line.
 */
public final class RunnerBridge {
    static {
        System.loadLibrary("edgedeploy_jni");
    }

    private RunnerBridge() {}

    /**
     * One runner invocation: {@code BUNDLE_DIR --prompt-file F [--max-new-tokens N] [--threads N]
     * [--touch-kv] [--no-verify] [--library PATH] [--device cpu|opencl]}. Never throws for a failed
     * run: the returned line then has {@code "error"} set (and {@code "error_kind"}).
     */
    public static native String run(String[] args);

    /** Host use: {@code java -Djava.library.path=DIR -cp CLASSES ai.edgedeploy.harness.RunnerBridge ARGS}. */
    public static void main(String[] args) {
        System.out.println(run(args));
    }
}
