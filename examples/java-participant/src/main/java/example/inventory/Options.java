package example.inventory;

import java.util.LinkedHashMap;
import java.util.Map;

/** Command-line options; every one has a default, and the broker also comes from KAFKA_BOOTSTRAP_SERVERS. */
final class Options {
    String bootstrap = System.getenv().getOrDefault("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092");
    String service = "inventory";
    String group;
    String reserveTopic = "ReserveStock";
    String releaseTopic = "ReleaseStock";
    int partitions = 4;
    Map<String, Integer> stock = new LinkedHashMap<>(Map.of("book", 10));

    static final String USAGE = String.join("\n",
            "usage: InventoryParticipant [--bootstrap HOST:PORT] [--service NAME] [--group GROUP]",
            "                            [--reserve-topic TOPIC] [--release-topic TOPIC]",
            "                            [--partitions N] [--stock ITEM=N,ITEM=N]",
            "defaults: --bootstrap $KAFKA_BOOTSTRAP_SERVERS or 127.0.0.1:9092, --service inventory,",
            "          --group {service}-participant, --reserve-topic ReserveStock,",
            "          --release-topic ReleaseStock, --partitions 4 (topics it creates), --stock book=10");

    static Options parse(String[] args) {
        Options options = new Options();
        for (int i = 0; i < args.length; i++) {
            String name = args[i];
            if (name.equals("--help") || name.equals("-h")) {
                System.out.println(USAGE);
                System.exit(0);
            }
            if (i + 1 >= args.length) {
                fail(name + ": needs a value");
            }
            String value = args[++i];
            switch (name) {
                case "--bootstrap" -> options.bootstrap = value;
                case "--service" -> options.service = value;
                case "--group" -> options.group = value;
                case "--reserve-topic" -> options.reserveTopic = value;
                case "--release-topic" -> options.releaseTopic = value;
                case "--partitions" -> options.partitions = number(name, value);
                case "--stock" -> options.stock = stock(value);
                default -> fail("unknown option " + name);
            }
        }
        if (options.group == null) {
            options.group = options.service + "-participant";
        }
        return options;
    }

    private static Map<String, Integer> stock(String text) {
        Map<String, Integer> stock = new LinkedHashMap<>();
        for (String entry : text.split(",")) {
            String[] parts = entry.split("=", 2);
            if (parts.length != 2 || parts[0].isBlank()) {
                fail("--stock: expected ITEM=N, got '" + entry + "'");
            }
            stock.put(parts[0].trim(), number("--stock " + parts[0], parts[1].trim()));
        }
        return stock;
    }

    private static int number(String name, String value) {
        try {
            int number = Integer.parseInt(value);
            if (number >= 0) {
                return number;
            }
        } catch (NumberFormatException e) {
            // reported below
        }
        fail(name + ": expected a non-negative integer, got '" + value + "'");
        return 0;
    }

    private static void fail(String message) {
        System.err.println("InventoryParticipant: " + message + "\n" + USAGE);
        System.exit(2);
    }
}
