// pgJDBC (org.postgresql:postgresql) through tailgres, as Java programs use
// it: DriverManager with a jdbc:postgresql URL. For one sslmode: login, a
// prepared query (the extended protocol), then Statement.cancel() from
// another thread while `select pg_sleep(20)` runs. pgJDBC sends the
// CancelRequest on a new connection and always in plaintext, even when
// the session itself is TLS. The query must fail with SQLSTATE 57014 and
// no other error, and the connection must stay usable.
//
// Prints one JSON line with what happened; exits non-zero on any failure.
//
//   java -cp DIR:postgresql.jar JdbcCheck HOST PORT SSLMODE [SSLFACTORY]
//
// Built by scripts/build-clients (javac) against the jar it fetches with
// Maven into target/clients/.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.atomic.AtomicReference;

public class JdbcCheck {
    static void fail(String msg) {
        System.err.println("JdbcCheck: " + msg);
        System.exit(1);
    }

    static String json(Map<String, Object> m) {
        StringBuilder b = new StringBuilder("{");
        for (Map.Entry<String, Object> e : m.entrySet()) {
            if (b.length() > 1) b.append(',');
            b.append(quote(e.getKey())).append(':');
            Object v = e.getValue();
            if (v == null) b.append("null");
            else if (v instanceof Number || v instanceof Boolean) b.append(v);
            else b.append(quote(v.toString()));
        }
        return b.append('}').toString();
    }

    static String quote(String s) {
        StringBuilder b = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            if (c == '"' || c == '\\') b.append('\\').append(c);
            else if (c < 0x20) b.append(String.format("\\u%04x", (int) c));
            else b.append(c);
        }
        return b.append('"').toString();
    }

    static int one(Connection conn, String sql) throws SQLException {
        try (Statement st = conn.createStatement(); ResultSet rs = st.executeQuery(sql)) {
            rs.next();
            return rs.getInt(1);
        }
    }

    @SuppressWarnings("try") // close() is timed inside try-with-resources
    public static void main(String[] args) throws Exception {
        if (args.length < 3 || args.length > 4) fail("usage: JdbcCheck HOST PORT SSLMODE [SSLFACTORY]");
        String host = args[0], port = args[1], sslmode = args[2];
        String app = "pgjdbc-" + sslmode;
        Properties props = new Properties();
        // CHECK_USER / CHECK_PASSWORD (empty: no password, identity login).
        props.setProperty("user", System.getenv().getOrDefault("CHECK_USER", "role_scram"));
        String password = System.getenv().getOrDefault("CHECK_PASSWORD", "scram-pass");
        if (!password.isEmpty()) props.setProperty("password", password);
        props.setProperty("sslmode", sslmode);
        if (args.length == 4) props.setProperty("sslfactory", args[3]);
        props.setProperty("ApplicationName", app);
        // pgJDBC puts ApplicationName in the StartupMessage (where the proxy,
        // and so the audit log, reads it) only when told the server is 9.0 or
        // later; otherwise it sends `SET application_name` after login and
        // the audit records show null.
        props.setProperty("assumeMinServerVersion", "9.0");
        props.setProperty("connectTimeout", "30");
        // CHECK_OPTIONS: more properties, "name=value" separated by spaces
        // (e.g. channelBinding=require).
        for (String kv : System.getenv().getOrDefault("CHECK_OPTIONS", "").trim().split("\\s+")) {
            int eq = kv.indexOf('=');
            if (eq > 0) props.setProperty(kv.substring(0, eq), kv.substring(eq + 1));
        }
        props.setProperty("socketTimeout", "60");
        String url = "jdbc:postgresql://" + host + ":" + port + "/app";

        Map<String, Object> out = new LinkedHashMap<>();
        out.put("driver", "pgjdbc");
        out.put("version", org.postgresql.util.DriverInfo.DRIVER_VERSION);
        out.put("sslmode", sslmode);
        out.put("sslfactory", args.length == 4 ? args[3] : null);

        try (Connection conn = DriverManager.getConnection(url, props)) {
            try (PreparedStatement ps = conn.prepareStatement("select ?::int + 1")) {
                ps.setInt(1, 41);
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    out.put("answer", rs.getInt(1));
                }
            }

            // Statement.cancel() from this thread while another runs the query.
            try (Statement st = conn.createStatement()) {
                AtomicReference<Object> outcome = new AtomicReference<>();
                Thread runner = new Thread(() -> {
                    try {
                        st.execute("select pg_sleep(20)");
                        outcome.set("finished");
                    } catch (Throwable t) {
                        outcome.set(t);
                    }
                });
                long started = System.nanoTime();
                runner.start();
                Thread.sleep(1000);
                st.cancel(); // throws on any error sending the CancelRequest
                runner.join(30_000);
                out.put("cancel_seconds", Math.round((System.nanoTime() - started) / 1e6) / 1000.0);
                Object o = outcome.get();
                if (o == null) fail("pg_sleep(20) still running 30 s after the cancel");
                if ("finished".equals(o)) fail("pg_sleep(20) finished: the cancel did not reach the database");
                if (!(o instanceof SQLException)) fail("pg_sleep(20) failed with " + o);
                SQLException e = (SQLException) o;
                out.put("query_sqlstate", e.getSQLState());
                out.put("query_error", e.getMessage());
                if (!"57014".equals(e.getSQLState())) {
                    fail("pg_sleep(20) failed with " + e.getSQLState() + " " + e.getMessage() + ", not 57014");
                }
                if (e.getNextException() != null) fail("more than the cancel: " + e.getNextException());
            }
            if (conn.isClosed()) fail("the connection was closed by the cancel");
            out.put("after_cancel", one(conn, "select 7"));
            long started = System.nanoTime();
            conn.close();
            out.put("close_seconds", Math.round((System.nanoTime() - started) / 1e6) / 1000.0);
        } catch (SQLException e) {
            fail("sslmode=" + sslmode + ": " + e.getSQLState() + " " + e);
        }
        System.out.println(json(out));
    }
}
