package example.inventory;

import java.nio.ByteBuffer;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.UUID;
import java.util.regex.Pattern;

import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.header.internals.RecordHeaders;

/** The header rules of docs/protocol.md section 3.3, and the records this participant writes. */
final class Wire {
    static final String PROTOCOL_VERSION = "saga-protocol-version";
    static final String KIND = "saga-kind";
    static final String EXECUTION_ID = "saga-execution-id";
    static final String REQUEST_ID = "saga-request-id";
    static final String REPLY_TOPIC = "saga-reply-topic";
    static final String IDEMPOTENCY_KEY = "saga-idempotency-key";
    static final String STEP = "saga-step";
    static final String PHASE = "saga-phase";
    static final String STATUS = "saga-status";
    static final String SERVICE = "saga-service";
    static final String TRACEPARENT = "traceparent";
    static final String TRACESTATE = "tracestate";
    static final String DEAD_LETTER_REASON = "saga-dead-letter-reason";
    static final String DEAD_LETTER_CODE = "saga-dead-letter-code";
    static final String DEAD_LETTER_TOPIC = "saga-dead-letter-topic";

    /** The version this participant speaks (section 10). */
    static final int VERSION = 1;

    private static final Pattern DIGITS = Pattern.compile("[0-9]+");

    private Wire() {}

    /** Why a record is set aside: a dead-letter code of section 12 and a reason for people. */
    static final class Refused extends Exception {
        final String code;

        Refused(String code, String reason) {
            super(reason);
            this.code = code;
        }

        static Refused malformed(String header, String why) {
            return new Refused("malformed", "malformed: " + header + ": " + why);
        }
    }

    /**
     * A record's headers as strings: UTF-8 values, a null value counts as missing, the last duplicate wins.
     * A value that is not valid UTF-8 makes the record malformed.
     */
    static Map<String, String> headers(ConsumerRecord<byte[], byte[]> record) throws Refused {
        Map<String, String> headers = new LinkedHashMap<>();
        Refused invalid = null;
        for (Header header : record.headers()) {
            byte[] value = header.value();
            if (value == null) {
                headers.remove(header.key());
                continue;
            }
            try {
                headers.put(header.key(), StandardCharsets.UTF_8.newDecoder()
                        .onMalformedInput(CodingErrorAction.REPORT)
                        .onUnmappableCharacter(CodingErrorAction.REPORT)
                        .decode(ByteBuffer.wrap(value)).toString());
            } catch (CharacterCodingException e) {
                headers.remove(header.key());
                if (invalid == null) {
                    invalid = Refused.malformed(header.key(), "header value is not valid UTF-8");
                }
            }
        }
        checkVersion(headers);
        if (invalid != null) {
            throw invalid;
        }
        return headers;
    }

    /** Section 10: missing means 1; a higher version is refused as unsupported_protocol. */
    static void checkVersion(Map<String, String> headers) throws Refused {
        String raw = headers.get(PROTOCOL_VERSION);
        if (raw == null || raw.isEmpty()) {
            return;
        }
        if (!DIGITS.matcher(raw).matches() || raw.length() > 9 || Integer.parseInt(raw) < 1) {
            throw Refused.malformed(PROTOCOL_VERSION, "not a positive integer: " + raw);
        }
        int version = Integer.parseInt(raw);
        if (version > VERSION) {
            throw new Refused("unsupported_protocol",
                    "unsupported_protocol: version " + version + " is newer than the supported version " + VERSION);
        }
    }

    /** A required header: missing or empty is malformed. */
    static String require(Map<String, String> headers, String name) throws Refused {
        String value = headers.get(name);
        if (value == null || value.isEmpty()) {
            throw Refused.malformed(name, "header missing");
        }
        return value;
    }

    /** A required UUID header, returned in canonical lowercase form. */
    static String requireUuid(Map<String, String> headers, String name) throws Refused {
        String value = require(headers, name);
        try {
            return UUID.fromString(value).toString();
        } catch (IllegalArgumentException e) {
            throw Refused.malformed(name, "not a UUID: " + value);
        }
    }

    /** A reply to a command (section 5), keyed by execution id, trace context copied. */
    static ProducerRecord<byte[], byte[]> reply(Command command, int status, byte[] value, String service) {
        RecordHeaders headers = new RecordHeaders();
        add(headers, PROTOCOL_VERSION, Integer.toString(VERSION));
        add(headers, KIND, "reply");
        add(headers, EXECUTION_ID, command.executionId);
        add(headers, REQUEST_ID, command.requestId);
        add(headers, STATUS, Integer.toString(status));
        add(headers, SERVICE, service);
        if (command.traceparent != null) {
            add(headers, TRACEPARENT, command.traceparent);
        }
        if (command.tracestate != null) {
            add(headers, TRACESTATE, command.tracestate);
        }
        return new ProducerRecord<>(command.replyTopic, null, utf8(command.executionId), value, headers);
    }

    /** A dead letter (section 12): the original record with why and where it came from. */
    static ProducerRecord<byte[], byte[]> deadLetter(
            ConsumerRecord<byte[], byte[]> record, String topic, Refused refused) {
        RecordHeaders headers = new RecordHeaders();
        for (Header header : record.headers()) {
            headers.add(header.key(), header.value());
        }
        headers.remove(DEAD_LETTER_REASON).remove(DEAD_LETTER_CODE).remove(DEAD_LETTER_TOPIC);
        add(headers, DEAD_LETTER_REASON, refused.getMessage());
        add(headers, DEAD_LETTER_CODE, refused.code);
        add(headers, DEAD_LETTER_TOPIC, record.topic());
        return new ProducerRecord<>(topic, null, record.key(), record.value(), headers);
    }

    static byte[] utf8(String text) {
        return text.getBytes(StandardCharsets.UTF_8);
    }

    private static void add(RecordHeaders headers, String name, String value) {
        headers.add(name, utf8(value));
    }
}
