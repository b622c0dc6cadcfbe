package example.inventory;

import java.time.Duration;
import java.util.ArrayList;
import java.util.Collection;
import java.util.HashMap;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.Set;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.Future;

import com.fasterxml.jackson.databind.JsonNode;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRebalanceListener;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.errors.TopicExistsException;
import org.apache.kafka.common.errors.WakeupException;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;

/**
 * An inventory service taking part in kafka-saga sagas, written from docs/protocol.md alone.
 *
 * <p>Forward commands on the reserve topic take stock ({"item": "book", "qty": 2}); compensations on the
 * release topic give back what the paired forward command (same execution and step) took. Outcomes are
 * stored by idempotency key so a redelivered command is answered from the store, a compensation that comes
 * before its forward command leaves a tombstone, and records that break the protocol are dead-lettered.
 * The stores are in memory: a real service keeps them in its database, in the transaction of its effects.
 */
public final class InventoryParticipant {
    private record Stored(int status, byte[] value) {}

    private final Options options;
    private final String controlTopic;
    private final String deadLetterTopic;
    private final KafkaConsumer<byte[], byte[]> consumer;
    private final KafkaProducer<byte[], byte[]> producer;
    private final Map<String, Integer> stock;
    /** Outcome of every command handled, by idempotency key (section 7). */
    private final Map<String, Stored> outcomes = new HashMap<>();
    /** (execution, step) pairs whose forward command was handled, and their tombstones (section 8). */
    private final Set<String> forwards = new HashSet<>();
    private final Set<String> tombstones = new HashSet<>();
    /** What each handled forward command reserved, by (execution, step): item and quantity. */
    private final Map<String, Map.Entry<String, Integer>> reservations = new HashMap<>();
    /** Decisions acted on, by idempotency key. */
    private final Set<String> decisions = new HashSet<>();
    /** Replies and dead letters of the batch in hand: all must be acknowledged before its offsets commit. */
    private final List<Future<RecordMetadata>> sent = new ArrayList<>();

    InventoryParticipant(Options options) {
        this.options = options;
        this.controlTopic = options.service + "SagaControl";
        this.deadLetterTopic = options.service + "DeadLetter";
        this.stock = new HashMap<>(options.stock);
        Properties consumerProps = new Properties();
        consumerProps.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, options.bootstrap);
        consumerProps.put(ConsumerConfig.GROUP_ID_CONFIG, options.group);
        consumerProps.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
        consumerProps.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
        consumerProps.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
        consumerProps.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
        this.consumer = new KafkaConsumer<>(consumerProps);
        Properties producerProps = new Properties();
        producerProps.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, options.bootstrap);
        producerProps.put(ProducerConfig.ACKS_CONFIG, "all");
        producerProps.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, "true");
        producerProps.put(ProducerConfig.LINGER_MS_CONFIG, "0");
        producerProps.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        producerProps.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        this.producer = new KafkaProducer<>(producerProps);
    }

    public static void main(String[] args) throws Exception {
        Options options = Options.parse(args);
        InventoryParticipant participant = new InventoryParticipant(options);
        Thread main = Thread.currentThread();
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            participant.consumer.wakeup();
            try {
                main.join(10_000);
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
        }));
        participant.run();
    }

    /** Consume until stopped: a batch's offsets commit once its replies and dead letters are acknowledged. */
    void run() throws Exception {
        createTopics();
        List<String> topics = List.of(options.reserveTopic, options.releaseTopic, controlTopic);
        consumer.subscribe(topics, new ConsumerRebalanceListener() {
            @Override
            public void onPartitionsRevoked(Collection<TopicPartition> partitions) {}

            @Override
            public void onPartitionsAssigned(Collection<TopicPartition> partitions) {
                log("ready: service " + options.service + " consuming " + topics + " as group " + options.group);
            }
        });
        log("stock " + stock);
        try {
            while (true) {
                var records = consumer.poll(Duration.ofMillis(200));
                if (records.isEmpty()) {
                    continue;
                }
                for (ConsumerRecord<byte[], byte[]> record : records) {
                    handle(record);
                }
                producer.flush();
                for (Future<RecordMetadata> future : sent) {
                    future.get(); // a reply that was not written stops the service before the commit
                }
                sent.clear();
                consumer.commitSync();
            }
        } catch (WakeupException e) {
            log("stopping");
        } finally {
            producer.close(Duration.ofSeconds(5));
            consumer.close(Duration.ofSeconds(5));
        }
    }

    private void handle(ConsumerRecord<byte[], byte[]> record) {
        try {
            Map<String, String> headers = Wire.headers(record);
            if (record.topic().equals(controlTopic)) {
                decide(headers);
            } else {
                command(Command.parse(record.topic(), headers, record.value()));
            }
        } catch (Wire.Refused refused) {
            log("dead-lettering " + record.topic() + "[" + record.partition() + "]@" + record.offset() + ": "
                    + refused.getMessage());
            sent.add(producer.send(Wire.deadLetter(record, deadLetterTopic, refused)));
        }
    }

    private void command(Command command) throws Wire.Refused {
        if (!command.topic.equals(options.reserveTopic) && !command.topic.equals(options.releaseTopic)) {
            throw new Wire.Refused("no_handler", "no_handler: no handler for command topic " + command.topic);
        }
        Stored outcome = outcomes.get(command.idempotencyKey);
        boolean duplicate = outcome != null;
        if (!duplicate) {
            outcome = firstDelivery(command);
            outcomes.put(command.idempotencyKey, outcome);
        }
        log((command.compensation ? "compensation " : "command ") + command.topic + " execution "
                + command.executionId + " step " + command.step + ": " + outcome.status
                + (duplicate ? " (duplicate, stored reply)" : "") + " traceparent " + command.traceparent);
        sent.add(producer.send(Wire.reply(command, outcome.status, outcome.value, options.service)));
    }

    /** Section 8: pair forward and compensation by (execution, step); a compensation first leaves a tombstone. */
    private Stored firstDelivery(Command command) {
        String pair = command.step == null ? null : command.executionId + ":" + command.step;
        if (command.compensation) {
            if (pair != null && !forwards.contains(pair)) {
                tombstones.add(pair);
                return new Stored(200, Json.bytes(Json.object()));
            }
            return run(() -> release(pair));
        }
        if (pair != null && tombstones.contains(pair)) {
            return new Stored(400, Json.error("cancelled"));
        }
        if (pair != null) {
            forwards.add(pair);
        }
        return run(() -> reserve(command.content, pair == null ? command.idempotencyKey : pair));
    }

    private interface Handler {
        Stored call() throws Exception;
    }

    private static Stored run(Handler handler) {
        try {
            return handler.call();
        } catch (Exception e) {
            return new Stored(500, Json.error(e.getClass().getSimpleName() + ": " + e.getMessage()));
        }
    }

    private Stored reserve(JsonNode content, String pair) {
        JsonNode item = content.path("item");
        JsonNode qty = content.path("qty");
        if (!item.isTextual() || !qty.canConvertToInt() || qty.asInt() < 1) {
            return new Stored(400, Json.error("expected {\"item\": text, \"qty\": a positive integer}"));
        }
        int left = stock.getOrDefault(item.asText(), 0);
        if (left < qty.asInt()) {
            return new Stored(400, Json.error("only " + left + " " + item.asText() + " left"));
        }
        stock.put(item.asText(), left - qty.asInt());
        reservations.put(pair, Map.entry(item.asText(), qty.asInt()));
        log("stock " + stock);
        return new Stored(200, Json.bytes(Json.object().put("reserved", qty.asInt()).put("left", left - qty.asInt())));
    }

    private Stored release(String pair) {
        Map.Entry<String, Integer> reserved = reservations.remove(pair);
        int released = 0;
        if (reserved != null) {
            stock.merge(reserved.getKey(), reserved.getValue(), Integer::sum);
            released = reserved.getValue();
            log("stock " + stock);
        }
        return new Stored(200, Json.bytes(Json.object().put("released", released)));
    }

    /** Section 9: act on each decision once; one naming another service is malformed. */
    private void decide(Map<String, String> headers) throws Wire.Refused {
        String kind = Wire.require(headers, Wire.KIND);
        if (!kind.equals("commit") && !kind.equals("reject")) {
            throw Wire.Refused.malformed(Wire.KIND, "expected 'commit' or 'reject', got '" + kind + "'");
        }
        String execution = Wire.requireUuid(headers, Wire.EXECUTION_ID);
        String key = Wire.require(headers, Wire.IDEMPOTENCY_KEY);
        String service = Wire.require(headers, Wire.SERVICE);
        if (!service.equals(options.service)) {
            throw Wire.Refused.malformed(Wire.SERVICE, "names '" + service + "', not '" + options.service + "'");
        }
        if (!decisions.add(key)) {
            log(kind + " execution " + execution + " (duplicate, ignored)");
            return;
        }
        // The saga is over either way: what it reserved is final (commit) or was given back (reject).
        List<String> settled = new ArrayList<>();
        for (String pair : reservations.keySet()) {
            if (pair.startsWith(execution + ":")) {
                settled.add(pair);
            }
        }
        settled.forEach(reservations::remove);
        log(kind + " execution " + execution + " traceparent " + headers.get(Wire.TRACEPARENT));
    }

    private void createTopics() throws InterruptedException, ExecutionException {
        Properties props = new Properties();
        props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, options.bootstrap);
        try (Admin admin = Admin.create(props)) {
            Set<String> existing = admin.listTopics().names().get();
            List<NewTopic> missing = new ArrayList<>();
            for (String topic : List.of(options.reserveTopic, options.releaseTopic, controlTopic, deadLetterTopic)) {
                if (!existing.contains(topic)) {
                    missing.add(new NewTopic(topic, options.partitions, (short) 1));
                }
            }
            try {
                admin.createTopics(missing).all().get();
            } catch (ExecutionException e) {
                if (!(e.getCause() instanceof TopicExistsException)) {
                    throw e;
                }
            }
        }
    }

    static void log(String message) {
        System.out.println("[inventory] " + message);
        System.out.flush();
    }
}
