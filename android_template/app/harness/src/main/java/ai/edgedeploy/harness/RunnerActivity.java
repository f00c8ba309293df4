package ai.edgedeploy.harness;

import android.app.Activity;
import android.content.Intent;
import android.os.Bundle;
import android.util.Log;

import java.io.File;
import java.io.FileInputStream;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;

/**
 * Runs a bundle inside an app process, where Android's real limits for apps apply.
 *
 * <pre>
 * adb shell am start -W -n ai.edgedeploy.harness/.RunnerActivity \
 *     --es bundle /sdcard/Android/data/ai.edgedeploy.harness/files/bundle \
 *     --es prompt_file /sdcard/Android/data/ai.edgedeploy.harness/files/prompt.json \
 *     --ei runs 3 [--ei max_new_tokens 64] [--ei threads 4] [--ez touch_kv true] [--es device opencl]
 * adb shell run-as ai.edgedeploy.harness cat files/results.jsonl   # one JSON result line per run
 * adb shell run-as ai.edgedeploy.harness cat files/done            # written last: "ok N" or "error ..."
 * </pre>
 */
public class RunnerActivity extends Activity {
    private static final String TAG = "edgedeploy";

    @Override
    protected void onCreate(Bundle savedInstanceState) {
        super.onCreate(savedInstanceState);
        final Intent intent = getIntent();
        new Thread(() -> runAll(intent), "edgedeploy-runner").start();
    }

    private void runAll(Intent intent) {
        File results = new File(getFilesDir(), "results.jsonl");
        File done = new File(getFilesDir(), "done");
        results.delete();
        done.delete();
        String status;
        int runs = Math.max(1, intent.getIntExtra("runs", 1));
        try {
            List<String> args = arguments(intent);
            for (int i = 0; i < runs; i++) {
                String line = RunnerBridge.run(args.toArray(new String[0]));
                Log.i(TAG, "run " + (i + 1) + "/" + runs + ": " + line);
                append(results, line + "\n");
            }
            status = "ok " + runs;
        } catch (Exception e) {
            Log.e(TAG, "harness failed", e);
            status = "error " + e;
        }
        try {
            append(done, status + "\n");
        } catch (IOException e) {
            Log.e(TAG, "cannot write " + done, e);
        }
        finish();
    }

    /** The runner's arguments from the intent's extras. */
    private List<String> arguments(Intent intent) throws IOException {
        String bundle = intent.getStringExtra("bundle");
        String prompt = intent.getStringExtra("prompt_file");
        if (bundle == null || prompt == null) {
            throw new IllegalArgumentException("extras 'bundle' and 'prompt_file' are required");
        }
        List<String> args = new ArrayList<>();
        args.add(bundle);
        args.add("--prompt-file");
        args.add(prompt);
        if (intent.hasExtra("max_new_tokens")) {
            args.add("--max-new-tokens");
            args.add(String.valueOf(intent.getIntExtra("max_new_tokens", 32)));
        }
        if (intent.hasExtra("threads")) {
            args.add("--threads");
            args.add(String.valueOf(intent.getIntExtra("threads", 0)));
        }
        if (intent.getBooleanExtra("touch_kv", false)) {
            args.add("--touch-kv");
        }
        if (intent.hasExtra("device")) {
            args.add("--device");
            args.add(intent.getStringExtra("device"));
        }
        // Shared storage is mounted noexec: the model library is copied into the app's code cache
        // (loadable because targetSdk is 28), the weights are read where they are.
        File lib = new File(bundle, "model.so");
        if (lib.isFile() && !bundle.startsWith(getApplicationInfo().dataDir)) {
            File copy = new File(getCodeCacheDir(), "model.so");
            copy(lib, copy);
            args.add("--library");
            args.add(copy.getAbsolutePath());
        }
        return args;
    }

    private static void copy(File from, File to) throws IOException {
        try (InputStream in = new FileInputStream(from); OutputStream out = new FileOutputStream(to)) {
            byte[] buf = new byte[1 << 16];
            for (int n; (n = in.read(buf)) > 0; ) {
                out.write(buf, 0, n);
            }
        }
    }

    private static void append(File file, String text) throws IOException {
        try (OutputStream out = new FileOutputStream(file, true)) {
            out.write(text.getBytes(StandardCharsets.UTF_8));
        }
    }
}
